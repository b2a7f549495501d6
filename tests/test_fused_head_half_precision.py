"""The chunked losses' head gradients in fp16/bf16, as DeepSpeed's half-precision engines run them.

A DeepSpeed fp16 engine holds fp16 parameters (the LM head included), so the hidden states and the head's
logits are fp16, and it calls backward on ``loss · scale`` with a dynamic loss scale (2^11 at the start as
minillm configures it, up to 2^16). Here the backward's incoming gradient is multiplied the same way. The
oracle is the plain, unfused head + loss in float64 on the same (half-precision-valued) inputs, written out
below. Both backward modes must give finite gradients within half-precision rounding of it:

* fused (gradients taken chunk by chunk in forward): at loss scale 1 a chunk's share of the token mean is mostly
  below fp16's normal range, and 65536 itself is inf in fp16, so neither may be computed in fp16;
* checkpointed (autograd through the rerun head): the plain half-precision backward, which a loss scale keeps
  out of the subnormals. At a tiny scale (1e-4) it underflows like any fp16 backward (the reason for loss
  scaling); the fused path then still matches the reference up to the final rounding to fp16.
"""

from __future__ import annotations

import pytest
import torch

from minillm.losses import chunked as CL

N, H, H_T, V, CHUNK = 256, 32, 16, 256, 64  # 4 chunks; a 1/256 share of the mean per token
KD_RATIO = 0.3


def make_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, N, H, generator=g).to(dtype)
    weight = (0.02 * torch.randn(V, H, generator=g)).to(dtype)
    t_hidden = torch.randn(1, N, H_T, generator=g).to(dtype)
    t_weight = (0.3 * torch.randn(V, H_T, generator=g)).to(dtype)
    labels = torch.randint(0, V, (1, N), generator=g)
    labels[0, -7:] = -100  # prompt/padding positions the KD loss skips
    return hidden, weight, t_hidden, t_weight, labels


def reference(kind: str, hidden, weight, t_hidden, t_weight, labels, scale: float):
    """The plain head + loss in float64: (loss, ∂(scale·loss)/∂hidden, ∂(scale·loss)/∂weight)."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    log_q = torch.log_softmax(h @ w.T, -1)
    log_p = torch.log_softmax(t_hidden.double() @ t_weight.double().T, -1)
    if kind == "minillm_kl":  # the single-step reverse KL, mean over all positions
        loss = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    else:  # kd: (1 − r)·CE + r·(−Σ p log q), means over the labelled positions
        keep = labels != -100
        ce = -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        kd = -(log_p.exp() * log_q).sum(-1)
        loss = (1 - KD_RATIO) * ce[keep].mean() + KD_RATIO * kd[keep].mean()
    g_hidden, g_weight = torch.autograd.grad(scale * loss, [h, w])
    return loss.detach(), g_hidden, g_weight


def chunked(kind: str, hidden, weight, t_hidden, t_weight, labels, scale: float, fused: bool):
    """The chunked loss on half-precision modules, backward on loss · scale: (loss, hidden.grad, weight.grad)."""
    dtype = hidden.dtype
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    t_head = torch.nn.Linear(H_T, V, bias=False, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(weight)
        t_head.weight.copy_(t_weight)
    h = hidden.clone().requires_grad_()
    if kind == "minillm_kl":
        loss = CL.chunked_single_step_kl(h, head, torch.ones(h.shape[:-1]), teacher_hidden=t_hidden,
                                         teacher_head=t_head, chunk_size=CHUNK, fused=fused)
    else:
        loss = CL.chunked_kd_loss(h, head, labels, teacher_hidden=t_hidden, teacher_head=t_head, kd_ratio=KD_RATIO,
                                  chunk_size=CHUNK, fused=fused).loss
    (loss * scale).backward()  # what DeepSpeed's fp16 loss scaler does
    assert h.grad.dtype == dtype and head.weight.grad.dtype == dtype  # autograd's contract: the inputs' dtypes
    return loss.detach(), h.grad, head.weight.grad


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("kind", ["minillm_kl", "kd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_half_precision_head_gradients_match_float64_at_every_loss_scale(kind, dtype, fused):
    inputs = make_inputs(dtype)
    eps = torch.finfo(dtype).eps  # 2^-10 for fp16, 2^-7 for bf16
    for scale in (2048.0, 65536.0, 1e-4):  # the initial DeepSpeed scale first: underflow shows there
        ref_loss, *ref_grads = reference(kind, *inputs, scale)
        loss, *grads = chunked(kind, *inputs, scale, fused)
        assert abs(loss.item() - ref_loss.item()) <= 2 * eps * abs(ref_loss.item()), (scale, loss, ref_loss)
        for name, got, ref in zip(("hidden", "head weight"), grads, ref_grads):
            assert torch.isfinite(got).all(), (name, scale)
            if not fused and dtype == torch.float16 and scale < 1:
                continue  # the plain fp16 backward underflows here: loss scaling exists for it
            # The reference's own rounding to the result dtype (dominant where a tiny scale makes the result
            # subnormal), plus half an epsilon for the forward's half-precision logits.
            rounding = relative_error(ref.to(dtype), ref)
            error = relative_error(got, ref)
            assert error <= rounding + eps / 2, (name, scale, error, rounding)


def test_the_per_chunk_backward_scale_never_overflows_fp16_with_large_gradients():
    """Few tokens (each a large share of the mean) and large logits: the fused path's own scale stays below fp16's
    range, so the gradients are finite and within rounding of the float64 ones wherever the loss scale keeps the
    result itself finite (65536 would not: DeepSpeed's scaler then skips the step and lowers the scale)."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.float16
    hidden = (0.05 * torch.randn(1, 3, H, generator=g)).to(dtype)  # moderate logits: a well-conditioned loss
    weight = (4.0 * torch.randn(V, H, generator=g)).to(dtype)  # large hidden-state gradients
    t_hidden = torch.randn(1, 3, H_T, generator=g).to(dtype)
    t_weight = (3.0 * torch.randn(V, H_T, generator=g)).to(dtype)
    labels = torch.randint(0, V, (1, 3), generator=g)
    for scale in (64.0, 1024.0):
        ref_loss, *ref_grads = reference("minillm_kl", hidden, weight, t_hidden, t_weight, labels, scale)
        assert max(float(r.abs().max()) for r in ref_grads) > 100.0  # large, but within fp16's range
        _, *grads = chunked("minillm_kl", hidden, weight, t_hidden, t_weight, labels, scale, fused=True)
        for got, ref in zip(grads, ref_grads):
            assert torch.isfinite(got).all()
            assert relative_error(got, ref) <= relative_error(ref.to(dtype), ref) + 2 * torch.finfo(dtype).eps
