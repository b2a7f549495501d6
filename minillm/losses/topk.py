"""Teacher distributions kept as their top-k entries (offline teacher caches, DESIGN §7).

A cached teacher row keeps the k largest log-probs and their ids; the remaining mass p_tail = 1 − Σ_topk p_v is
spread evenly over the V − k other entries (:func:`expand_topk`). That is a documented approximation of the
teacher's tail; with k = V it is the distribution itself.

:class:`TopKLogprobs` carries a [B, L] grid of such rows to the chunked losses (``teacher_logprobs=``), which
expand only the rows of the chunk they are working on, on the student's device. Expanding a whole micro-batch
instead builds a [B, L, V] fp32 tensor first (16 × 384 × 50,272 positions: 1.2 GB, on the CPU where the cache
lives), a cost that can exceed the teacher forward it replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["expand_topk", "TopKLogprobs"]


def expand_topk(ids: Tensor, logprobs: Tensor, vocab_size: int) -> Tensor:
    """Dense log-probs [..., V] from the top-k ids/log-probs [..., k].

    The kept entries are as stored (renormalised in fp32); the tail mass 1 − Σ_k p is spread evenly over the other
    V − k entries (−inf there when k = V or no mass is left)."""
    if ids.shape != logprobs.shape:
        raise ValueError(f"expand_topk: ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} differ")
    k = ids.shape[-1]
    if k > vocab_size:
        raise ValueError(f"expand_topk: k={k} exceeds the vocabulary size {vocab_size}")
    lp = logprobs.float()
    kept = torch.logsumexp(lp, dim=-1, keepdim=True)  # log Σ_topk p (≤ 0 up to storage rounding)
    if k < vocab_size:
        tail = torch.log(-torch.expm1(kept.clamp(max=0.0))) - math.log(vocab_size - k)  # log(p_tail / (V − k))
    else:
        tail = torch.full_like(kept, -math.inf)
    dense = tail.expand(*lp.shape[:-1], vocab_size).clone()
    dense.scatter_(-1, ids.long(), lp)
    return torch.log_softmax(dense, dim=-1)  # storage rounding: make it a distribution again


@dataclass(frozen=True)
class TopKLogprobs:
    """Teacher log-probs over a [..., V] grid stored as top-k rows: ``ids`` (any integer dtype) and ``logprobs``
    (any float dtype), both [..., k], on any device. Stands in for a dense [..., V] tensor wherever the chunked
    losses take ``teacher_logprobs``: :meth:`rows` expands only the positions asked for."""

    ids: Tensor
    logprobs: Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() < 1:
            raise ValueError(f"TopKLogprobs: ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             "must have one shape [..., k]")
        if not 1 <= self.ids.shape[-1] <= self.vocab_size:
            raise ValueError(f"TopKLogprobs: k={self.ids.shape[-1]} must lie in [1, vocab_size={self.vocab_size}]")

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense tensor this stands for: [..., V]."""
        return torch.Size((*self.ids.shape[:-1], self.vocab_size))

    def rows(self, flat_index: Tensor, device: torch.device | str) -> Tensor:
        """[n, V] fp32 log-probs of the positions ``flat_index`` [n] of the flattened grid, expanded on ``device``
        (only the [n, k] top-k rows travel there)."""
        k = self.ids.shape[-1]
        index = flat_index.to(self.ids.device)
        ids = self.ids.reshape(-1, k).index_select(0, index).to(device, non_blocking=True)
        logprobs = self.logprobs.reshape(-1, k).index_select(0, index).to(device, non_blocking=True)
        return expand_topk(ids, logprobs, self.vocab_size)

    def dense(self, device: torch.device | str | None = None) -> Tensor:
        """The whole [..., V] fp32 tensor (for the plain, unchunked losses)."""
        device = self.ids.device if device is None else device
        return expand_topk(self.ids.to(device), self.logprobs.to(device), self.vocab_size)
