"""Chunked head losses whose gradients are computed in the forward pass (no recompute in backward).

A chunked vocabulary-wide loss (``minillm.losses.chunked.chunked_*``) that is a *fixed linear combination* of
per-position terms, loss = Σ_chunks ℓ_c(head(h_c)), has everything its gradient needs at forward time: the
chunk's logits, the teacher's log-probabilities and the reduction weights. So each chunk runs its head
forward and backward at once and keeps only ∂loss/∂h_c [c, H] and ∂loss/∂W (the head's parameters, summed
over chunks in fp32); the chunk's [c, V] tensors are freed before the next chunk starts, as with
checkpointing. The loss's backward then scales the stored gradients by the incoming gradient (the loss
scale, a coefficient) and hands them to autograd, so they reach the hidden states, the body of the model and
the parameters' usual gradient hooks (DeepSpeed ZeRO-1/2 bucketing) exactly as a plain backward would.

Checkpointing (the other way to keep one chunk alive) reruns both heads in backward. With a 13B teacher's
head that is ~45% more FLOPs than the plain loss; the fused way needs the plain loss's FLOPs (Liger-Kernel's
fused linear cross-entropy works the same way). Its extra memory is one fp32 copy of the head's parameters
([V, H]) and one of the hidden rows ([n, H]).

Not used when the head's parameters are partitioned by ZeRO-3 (gathered only inside the module's own call, so
they cannot be differentiated outside it), for heads that are not ``nn.Module`` (any callable works with the
checkpointed path), or when no gradient is needed. Double backward is not supported.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["fusable_parameters", "fused_chunk_loss"]


def fusable_parameters(head) -> list[tuple[str, nn.Parameter]] | None:
    """The head's trainable (name, parameter) pairs, or None when its gradient cannot be taken in forward.

    None for heads that are not modules, and for ZeRO-3 partitioned parameters (DeepSpeed marks them with
    ``ds_id``; their data exists only inside the module's own forward).
    """
    if not isinstance(head, nn.Module):
        return None
    named = list(head.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in named):
        return None
    return [(name, p) for name, p in named if p.requires_grad]


class _InjectGradients(torch.autograd.Function):
    """``value`` in forward; in backward ``grads[i] · grad_out`` for ``inputs[i]``.

    The product is taken in the wider of the two dtypes (the fp32 sums times the loss scale: DeepSpeed's fp16
    scale of 65536 would be inf in fp16) and only the result is cast, once, to the input's dtype, as autograd
    requires of a gradient."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in inputs]
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        scaled = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            wide = torch.promote_types(g.dtype, grad_out.dtype)
            scaled.append((g.to(wide) * grad_out.to(wide)).to(dtype))
        return (None, None, *scaled)


def _is_half(t: Tensor) -> bool:
    return t.is_floating_point() and t.dtype.itemsize < 4


# Where the largest scaled gradient of a half-precision head backward may reach: 2^13 leaves 8x headroom below
# fp16's largest finite value (65504) and keeps 2^37 of range above its smallest subnormal (2^-24).
_HALF_TARGET = 2.0 ** 13


def _max_abs(tensors: list[Tensor], device: torch.device) -> Tensor:
    """max |x| over all entries of ``tensors`` as a 0-dim fp32 tensor (0 for none), without a host sync."""
    with torch.no_grad():
        maxima = [t.detach().abs().amax().float() for t in tensors if t.numel()]
        return torch.stack(maxima).amax() if maxima else torch.zeros((), dtype=torch.float32, device=device)


def _backward_scale(g_logits: Tensor, rows: Tensor, weight_max: Tensor) -> Tensor:
    """A power of two S (a 0-dim fp32 tensor: no host sync) for back-propagating ``S · g_logits`` through a
    half-precision head without overflow or underflow: the per-chunk twin of a loss scale.

    At loss scale 1 the gradients of one chunk's share of a token mean (1/n of it) are mostly below fp16's
    normal range (6e-5), so a plain half-precision backward would lose them to subnormals or zero. For a linear
    head h → h Wᵀ (+ b) with logit gradients g, every gradient entry (and partial sum) is bounded:
    |∂/∂h_i| ≤ ‖g_i‖₁·max|W|, |∂/∂W_v| ≤ ‖g_:v‖₁·max|h|, |∂/∂b_v| ≤ ‖g_:v‖₁, and |g| itself by either; S puts
    the largest of these bounds (with max|W|, max|h| taken as at least 1) at ``_HALF_TARGET``. Scaling by a
    power of two and dividing back in fp32 is exact.
    """
    with torch.no_grad():
        g = g_logits.reshape(-1, g_logits.shape[-1]).float()
        one = torch.ones((), dtype=torch.float32, device=g.device)
        h_max = torch.maximum(rows.detach().abs().amax().float(), one) if rows.numel() else one
        w_max = torch.maximum(weight_max.float(), one)
        row_l1 = torch.linalg.vector_norm(g, ord=1, dim=-1).amax() if g.numel() else one
        col_l1 = torch.linalg.vector_norm(g, ord=1, dim=0).amax() if g.numel() else one
        bound = torch.maximum(row_l1 * w_max, col_l1 * h_max)
        # bound 0 (no gradient) → 2^64, non-finite → 2^-64: either way a finite, exactly invertible scale
        return torch.exp2(torch.floor(torch.log2(_HALF_TARGET / bound)).nan_to_num(-64.0).clamp(-64.0, 64.0))


def fused_chunk_loss(chunk_loss: Callable[[Tensor, int, int], Tensor], hidden: Tensor, head: nn.Module,
                     params: list[tuple[str, nn.Parameter]], bounds: Sequence[tuple[int, int]]) -> Tensor:
    """Σ over ``bounds`` (at least one) of ``chunk_loss(head(hidden[lo:hi]), lo, hi)`` → scalar, differentiated
    chunk by chunk.

    ``hidden`` [n, H] are the rows the chunks slice; ``params`` come from :func:`fusable_parameters`. The head
    runs with detached stand-ins for its parameters, so nothing is accumulated into ``.grad`` and no parameter
    hook fires in forward. Every head call happens in forward; backward calls nothing.

    Half precision (fp16/bf16 hidden states or parameters, as DeepSpeed's fp16/bf16 engines hold them, or a
    caller's autocast): the head's matmuls run in it, as in the plain loss, but its gradients are not taken at
    loss scale 1 in it. ``chunk_loss`` is differentiated in fp32 with respect to the fp32 logits; that gradient
    goes back through the head multiplied by a per-chunk power of two (:func:`_backward_scale`), and the head's
    gradients are divided by it in fp32 and summed over chunks in fp32. Only the backward's final product with
    the incoming gradient (the loss scale) is cast to the inputs' dtypes.
    """
    from torch.func import functional_call

    needs_hidden = hidden.requires_grad
    names = [name for name, _ in params]

    def wide(t: Tensor) -> torch.dtype:  # at least fp32: sums of many small chunks' contributions
        return torch.promote_types(t.dtype, torch.float32)

    grad_hidden = torch.zeros(hidden.shape, dtype=wide(hidden), device=hidden.device) if needs_hidden else None
    grad_params = [torch.zeros(p.shape, dtype=wide(p), device=p.device) for _, p in params]
    autocast = torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")
    half = autocast or _is_half(hidden) or any(_is_half(p) for _, p in params)
    weight_max: Tensor | None = None  # max |parameter| for the backward scale's bound, once per call
    total = None
    for lo, hi in bounds:
        rows = hidden[lo:hi].detach().requires_grad_(needs_hidden)
        stand_ins = [p.detach().requires_grad_() for _, p in params]
        with torch.enable_grad():
            logits = functional_call(head, dict(zip(names, stand_ins)), (rows,))
            # the loss from (and its gradient at) fp32 copies of the logits: the loss math upcasts them anyway
            exact = logits.detach().to(wide(logits)).requires_grad_()
            part = chunk_loss(exact, lo, hi)
            wrt = ([rows] if needs_hidden else []) + stand_ins
            grads: list[Tensor | None] = []
            if part.requires_grad and logits.requires_grad:
                (g_logits,) = torch.autograd.grad(part, exact)
                scale = None
                if half or _is_half(logits):
                    if weight_max is None:
                        weight_max = _max_abs([p for _, p in params], hidden.device)
                    scale = _backward_scale(g_logits, rows, weight_max)
                    g_logits = g_logits * scale
                grads = list(torch.autograd.grad(logits, wrt, g_logits.to(logits.dtype), allow_unused=True))
                grads = [None if g is None else g.to(wide(g)) if scale is None else g.to(wide(g)) / scale
                         for g in grads]
                del g_logits
        if needs_hidden and grads:
            g_rows = grads.pop(0)
            if g_rows is not None:
                grad_hidden[lo:hi] = g_rows
        for acc, g in zip(grad_params, grads):
            if g is not None:
                acc += g
        total = part.detach() if total is None else total + part.detach()
        del logits, exact, part, grads  # this chunk's [c, V] tensors go before the next chunk's head call
        if autocast:
            # Inside a caller's autocast region, autocast caches a low-precision copy of every grad-requiring leaf
            # it casts until the region ends: one [V, H] copy per chunk's stand-ins. Drop them chunk by chunk.
            torch.clear_autocast_cache()
    inputs = ([hidden] if needs_hidden else []) + [p for _, p in params]
    grads = ([grad_hidden] if needs_hidden else []) + grad_params
    return _InjectGradients.apply(total, tuple(grads), *inputs)
