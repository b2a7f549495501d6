"""Chunked head losses whose gradients are computed in the forward pass (no recompute in backward).

A chunked vocabulary-wide loss (``minillm.chunked_losses.chunked_*``) that is a *fixed linear combination* of
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
    """``value`` in forward; in backward ``grads[i] · grad_out`` for ``inputs[i]`` (in the input's dtype)."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in inputs]
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        scaled = [(g * grad_out.to(g.dtype)).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (None, None, *scaled)


def fused_chunk_loss(chunk_loss: Callable[[Tensor, int, int], Tensor], hidden: Tensor, head: nn.Module,
                     params: list[tuple[str, nn.Parameter]], bounds: Sequence[tuple[int, int]]) -> Tensor:
    """Σ over ``bounds`` (at least one) of ``chunk_loss(head(hidden[lo:hi]), lo, hi)`` → scalar, differentiated
    chunk by chunk.

    ``hidden`` [n, H] are the rows the chunks slice; ``params`` come from :func:`fusable_parameters`. The head
    runs with detached stand-ins for its parameters, so nothing is accumulated into ``.grad`` and no parameter
    hook fires in forward. Every head call happens in forward; backward calls nothing.
    """
    from torch.func import functional_call

    needs_hidden = hidden.requires_grad
    names = [name for name, _ in params]
    grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
    # summed over chunks in at least fp32 (bf16 parameters would lose the small chunks' contributions)
    grad_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for _, p in params]
    total = None
    for lo, hi in bounds:
        rows = hidden[lo:hi].detach().requires_grad_(needs_hidden)
        stand_ins = [p.detach().requires_grad_() for _, p in params]
        with torch.enable_grad():
            part = chunk_loss(functional_call(head, dict(zip(names, stand_ins)), (rows,)), lo, hi)
            wrt = ([rows] if needs_hidden else []) + stand_ins
            grads = list(torch.autograd.grad(part, wrt, allow_unused=True)) if part.requires_grad else []
        if needs_hidden and grads:
            g_rows = grads.pop(0)
            if g_rows is not None:
                grad_hidden[lo:hi] = g_rows
        for acc, g in zip(grad_params, grads):
            if g is not None:
                acc += g
        total = part.detach() if total is None else total + part.detach()
        if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
            # Inside a caller's autocast region, autocast caches a low-precision copy of every grad-requiring leaf
            # it casts until the region ends: one [V, H] copy per chunk's stand-ins. Drop them chunk by chunk.
            torch.clear_autocast_cache()
    inputs = ([hidden] if needs_hidden else []) + [p for _, p in params]
    grads = ([grad_hidden] if needs_hidden else []) + grad_params
    return _InjectGradients.apply(total, tuple(grads), *inputs)
