"""Memory-lean twins of the vocabulary-wide losses in :mod:`minillm.losses` (DESIGN §4 memory note).

The plain vocabulary-wide losses take ``[B, L, V]`` logits. Their ``chunked_*`` twins take hidden states
``[B, L, H]`` and a callable LM head ``head(h: [N, H]) -> [N, V]`` and walk the valid token positions chunk by
chunk, so only one chunk's ``[chunk, V]`` logits (of each model) are alive at a time, in forward and in
backward. The scalar losses (single-step KL, PT loss, divergences) take each chunk's gradients in its forward
when the head is an ``nn.Module`` (:mod:`minillm.losses.fused_head`): the plain loss's FLOPs, no recompute. Per-token
log-probs, plain callables and ZeRO-3 partitioned heads use non-reentrant activation checkpointing instead,
which reruns each chunk's student and teacher head in backward. Calling the real ``lm_head`` module keeps
DeepSpeed ZeRO-3 parameter hooks firing; ``num_chunks`` pads the number of head calls so every rank makes the
same number (all-reduce the max of :func:`chunk_count` first).

Each ``chunked_*`` function equals its plain twin (values and gradients, to fp32 rounding); the tests compare
them in float64 to 1e-12. With half-precision heads (DeepSpeed's fp16/bf16 engines, autocast) the loss math
still runs in fp32 on the upcast logits, and the fused backward stays within half-precision rounding of the
float64 gradients at any loss scale (:func:`minillm.losses.fused_head.fused_chunk_loss`); the checkpointed backward
is autograd through the head in its precision, like the plain loss, so it relies on the engine's loss scale.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from . import IGNORE_INDEX
from .core import (_check_divergence_args, _check_shape, _divergence_terms, _kl_terms, _log_softmax, _ppo_terms,
                   _pt_terms, _upcast)
from .topk import TopKLogprobs

Tensor = torch.Tensor
Head = Callable[[Tensor], Tensor]

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: ~4 live [chunk, V] fp32 buffers, 0.8 GB at V = 50K


def chunk_count(mask: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Head calls a chunked loss makes for this mask (``labels != -100`` for the PT loss) in its forward:
    ⌈valid positions / chunk_size⌉, at least 1.

    Under ZeRO-3, all-reduce the max of this over ranks and pass it as ``num_chunks`` (one host sync).
    """
    return max(1, math.ceil(int((mask != 0).sum()) / chunk_size))


class _ChunkPlan(NamedTuple):
    """The valid rows of a chunked loss and how to evaluate one chunk of them."""

    hidden: Tensor  # [n, H] student hidden rows at the valid positions
    index: Tensor  # [n] their flat positions in the [B, L] grid
    values: Callable[..., Tensor]  # (student logits [c, V], rows lo:hi of index, teacher hidden, *extras) -> [c(, k)]
    args: Callable[[int, int], tuple]  # rows lo:hi of (index, teacher hidden | None, *extras)
    bounds: list[tuple[int, int]]  # (lo, hi) per head call; calls past the data are empty slices


def _plan_chunks(kernel: Callable[..., Tensor], student_hidden: Tensor, valid: Tensor, extras: Sequence[Tensor], *,
                 teacher_hidden: Tensor | None, teacher_head: Head | None,
                 teacher_logprobs: Tensor | TopKLogprobs | None, need_teacher: bool, temperature: float,
                 chunk_size: int, num_chunks: int | None, caller: str) -> _ChunkPlan:
    """Check the inputs of a chunked loss and gather its valid rows; ``kernel(log_q [c, V], log_p [c, V] | None,
    *extras_c) -> [c(, k)]`` gives the per-position values."""
    if student_hidden.dim() < 2:
        raise ValueError(f"minillm.chunked_losses.{caller}: student_hidden must be [B, L, H], "
                         f"got {tuple(student_hidden.shape)}")
    grid = student_hidden.shape[:-1]
    _check_shape("mask/labels", valid, grid, f"{caller} (student_hidden.shape[:-1])")
    if chunk_size < 1:
        raise ValueError(f"minillm.chunked_losses.{caller}: chunk_size={chunk_size} must be ≥ 1")
    if num_chunks is not None and num_chunks < 1:
        raise ValueError(f"minillm.chunked_losses.{caller}: num_chunks={num_chunks} must be ≥ 1 or None")
    has_head = teacher_hidden is not None or teacher_head is not None
    if need_teacher:
        incomplete_head = has_head and (teacher_hidden is None or teacher_head is None)
        if has_head == (teacher_logprobs is not None) or incomplete_head:
            raise ValueError(f"minillm.chunked_losses.{caller}: pass the teacher either as teacher_hidden + teacher_head or "
                             "as precomputed teacher_logprobs [B, L, V], not both and not neither")
    elif has_head or teacher_logprobs is not None:
        raise ValueError(f"minillm.chunked_losses.{caller}: got teacher inputs this loss does not use")
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_logprobs", teacher_logprobs)):
        if t is not None and tuple(t.shape[:-1]) != tuple(grid):
            raise ValueError(f"minillm.chunked_losses.{caller}: `{name}` has shape {tuple(t.shape)}; its leading dims must "
                             f"match student_hidden's {tuple(grid)}")

    index = (valid.reshape(-1) != 0).nonzero().squeeze(-1)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, index)
    extras = [e.reshape(-1).index_select(0, index) for e in extras]
    t_hidden = None
    if teacher_hidden is not None:
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, index)
    t_flat = teacher_logprobs.detach().reshape(-1, teacher_logprobs.shape[-1]) \
        if isinstance(teacher_logprobs, Tensor) else None
    t_topk = teacher_logprobs if isinstance(teacher_logprobs, TopKLogprobs) else None  # expanded chunk by chunk

    def values(student_logits: Tensor, idx: Tensor, th: Tensor | None, *ex: Tensor) -> Tensor:
        log_q = _log_softmax(student_logits, temperature)
        log_p = None
        with torch.no_grad():
            if th is not None:
                log_p = _log_softmax(teacher_head(th), temperature)
            elif t_flat is not None:  # cached log-probs (maybe bf16, maybe in pinned CPU memory): renormalised
                rows = t_flat.index_select(0, idx.to(t_flat.device))  # in fp32 on the student's device, no T
                log_p = _log_softmax(rows.to(student_logits.device, non_blocking=True))
            elif t_topk is not None:  # top-k rows (an offline teacher cache): only this chunk's, expanded here
                log_p = t_topk.rows(idx, student_logits.device)
        if log_p is not None and log_p.shape[-1] != log_q.shape[-1]:
            raise ValueError(f"minillm.chunked_losses.{caller}: student vocabulary {log_q.shape[-1]} != teacher vocabulary "
                             f"{log_p.shape[-1]}; slice the heads' outputs to the shared vocabulary")
        return kernel(log_q, log_p, *ex)

    def args(lo: int, hi: int) -> tuple:
        return (index[lo:hi], None if t_hidden is None else t_hidden[lo:hi], *[e[lo:hi] for e in extras])

    n = index.numel()
    count = max(1, math.ceil(n / chunk_size), num_chunks or 0)
    bounds = [(min(i * chunk_size, n), min((i + 1) * chunk_size, n)) for i in range(count)]
    return _ChunkPlan(hidden, index, values, args, bounds)


def _checkpointed_values(plan: _ChunkPlan, student_head: Head) -> Tensor:
    """Per-position values [n(, k)], each chunk under non-reentrant checkpointing: its logits are freed after
    its forward and recomputed (student and teacher head) in backward, so at most one chunk's [c, V] tensors
    are alive at any time. Works with any callable head, ZeRO-3 partitioned ones included."""

    def chunk_fn(h: Tensor, *rest: Tensor | None) -> Tensor:
        return plan.values(student_head(h), *rest)

    # A frozen ZeRO-3 head (a LoRA student's): its recompute runs outside every module's backward, so DeepSpeed
    # releases the weight right after the head's forward and non-reentrant checkpointing finds it empty ([0])
    # where its forward saved it. Reentrant checkpointing backpropagates through the recomputed output at once,
    # and the head's own backward hook fetches the weight for that backward.
    reentrant = isinstance(student_head, torch.nn.Module) and any(
        hasattr(p, "ds_id") and not p.requires_grad for p in student_head.parameters())
    outputs = []
    for lo, hi in plan.bounds:  # the same head calls on every rank, whatever its data
        args = (plan.hidden[lo:hi], *plan.args(lo, hi))
        if torch.is_grad_enabled():
            outputs.append(checkpoint(chunk_fn, *args, use_reentrant=reentrant))
        else:
            outputs.append(chunk_fn(*args))
    return torch.cat(outputs)


def _weighted_sum(values: Tensor, coef: Tensor) -> Tensor:
    """Σ coef·values over entries with coef ≠ 0 (others never leak in, even as inf/NaN) → scalar."""
    values = _upcast(values)
    coef = coef.to(values.dtype)
    return torch.where(coef != 0, values * coef, torch.zeros_like(values)).sum()


def _chunked_loss(plan: _ChunkPlan, student_head: Head, coef: Tensor, fused: bool | None, caller: str,
                  report: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Σ coef·values over all chunks → scalar, a fixed linear combination of per-position values ``coef`` [n(, k)].

    Fused (default where possible, :mod:`minillm.losses.fused_head`): each chunk's gradients are taken in its forward
    and backward only scales them, the plain loss's FLOPs. Otherwise checkpointed: both heads rerun per chunk
    in backward. ``fused=None`` picks fused for ``nn.Module`` heads whose parameters are not ZeRO-3 partitioned
    when a gradient is needed; ``True`` insists; ``False`` checkpoints. With ``report`` [n] weights, also
    returns the detached per-column sums Σ_i report_i·values_ik [k] (e.g. the token means of each term).
    """
    from .fused_head import fusable_parameters, fused_chunk_loss

    params = fusable_parameters(student_head)
    if fused and params is None:
        raise ValueError(f"minillm.chunked_losses.{caller}: fused=True needs an nn.Module student head whose "
                         "parameters are not ZeRO-3 partitioned; pass fused=None to fall back to checkpointing")
    wanted = torch.is_grad_enabled() and (plan.hidden.requires_grad or bool(params))
    reported: list[Tensor] = []

    def column_sums(values: Tensor, rows: Tensor) -> Tensor:
        values = _upcast(values.detach())
        rows = rows.to(values.dtype).reshape(-1, *[1] * (values.dim() - 1))
        return torch.where(rows != 0, values * rows, torch.zeros_like(values)).sum(0)

    if params is not None and wanted and fused is not False:
        def chunk_loss(student_logits: Tensor, lo: int, hi: int) -> Tensor:
            values = plan.values(student_logits, *plan.args(lo, hi))
            if report is not None:
                reported.append(column_sums(values, report[lo:hi]))
            return _weighted_sum(values, coef[lo:hi])

        loss = fused_chunk_loss(chunk_loss, plan.hidden, student_head, params, plan.bounds)
    else:
        values = _checkpointed_values(plan, student_head)
        loss = _weighted_sum(values, coef)
        if report is not None:
            reported.append(column_sums(values, report))
    return loss if report is None else (loss, torch.stack(reported).sum(0))


def _mean_coefficients(mask: Tensor, index: Tensor) -> Tensor:
    """Per valid position, m_i / Σm: the weights of `masked_mean` over the valid rows (0 if Σm = 0)."""
    m = mask.reshape(-1).index_select(0, index).to(torch.float64)
    total = m.sum()
    return m / torch.where(total != 0, total, torch.ones_like(total))


def chunked_token_logprobs(hidden: Tensor, head: Head, tokens: Tensor, mask: Tensor | None = None, *,
                           temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           num_chunks: int | None = None) -> Tensor:
    """`token_logprobs` from hidden states [B, L, H] and ``head`` → [B, L], 0 where mask = 0 (not computed there).

    Use it for teacher and student scoring; under ``torch.no_grad`` no checkpointing happens.
    """
    _check_shape("tokens", tokens, hidden.shape[:-1], "chunked_token_logprobs (hidden.shape[:-1])")
    valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask

    def kernel(log_q: Tensor, _log_p: None, tok: Tensor) -> Tensor:
        return log_q.gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    plan = _plan_chunks(kernel, hidden, valid, [tokens.long()], teacher_hidden=None, teacher_head=None,
                        teacher_logprobs=None, need_teacher=False, temperature=temperature, chunk_size=chunk_size,
                        num_chunks=num_chunks, caller="chunked_token_logprobs")
    values, index = _checkpointed_values(plan, head), plan.index
    out = values.new_zeros(tokens.numel()).index_copy(0, index, values)
    return out.reshape(tokens.shape)


def chunked_single_step_kl(student_hidden: Tensor, student_head: Head, mask: Tensor, *,
                           teacher_hidden: Tensor | None = None, teacher_head: Head | None = None,
                           teacher_logprobs: Tensor | TopKLogprobs | None = None, temperature: float = 1.0,
                           weights: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           num_chunks: int | None = None, fused: bool | None = None) -> Tensor:
    """`single_step_kl` from hidden states → scalar, one chunk of [chunk, V] logits alive at a time.

    Student: ``student_hidden`` [B, L, H] and ``student_head`` (e.g. the lm_head module). Teacher: either
    ``teacher_hidden`` [B, L, H_t] + ``teacher_head``, both logits divided by ``temperature``; or
    ``teacher_logprobs`` [B, L, V] cached at scoring time (any float dtype, on the student's device or in
    pinned CPU memory, already at the temperature; renormalised in fp32), or a :class:`minillm.losses.topk.TopKLogprobs`
    (an offline teacher cache's top-k rows). Only positions with mask ≠ 0 are evaluated; each chunk's rows of the
    cache are moved to the device inside the chunk (top-k rows are expanded to [chunk, V] there).
    """
    extras = []
    if weights is not None:
        _check_shape("weights", weights, mask.shape, "chunked_single_step_kl (mask.shape)")
        extras = [_upcast(weights).detach()]

    def kernel(log_q: Tensor, log_p: Tensor, *w_c: Tensor) -> Tensor:
        kl = _kl_terms(log_q, log_p)
        return kl * w_c[0] if w_c else kl

    plan = _plan_chunks(kernel, student_hidden, mask, extras, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                        teacher_logprobs=teacher_logprobs, need_teacher=True, temperature=temperature,
                        chunk_size=chunk_size, num_chunks=num_chunks, caller="chunked_single_step_kl")
    return _chunked_loss(plan, student_head, _mean_coefficients(mask, plan.index), fused, "chunked_single_step_kl")


def chunked_pt_loss(student_hidden: Tensor, student_head: Head, labels: Tensor, *,
                    teacher_hidden: Tensor | None = None, teacher_head: Head | None = None,
                    teacher_logprobs: Tensor | TopKLogprobs | None = None, kd_ratio: float = 0.5,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, num_chunks: int | None = None,
                    fused: bool | None = None) -> Tensor:
    """`pt_loss` from hidden states → scalar; teacher as in `chunked_single_step_kl` (optional: plain CE).

    The PT loss is `chunked_kd_loss` with the reference KD term (``fkl``) at T = 1."""
    return chunked_kd_loss(student_hidden, student_head, labels, teacher_hidden=teacher_hidden,
                           teacher_head=teacher_head, teacher_logprobs=teacher_logprobs, kd_ratio=kd_ratio,
                           chunk_size=chunk_size, num_chunks=num_chunks, fused=fused).loss


def chunked_divergence(student_hidden: Tensor, student_head: Head, mask: Tensor, kind: str, *,
                       teacher_hidden: Tensor | None = None, teacher_head: Head | None = None,
                       teacher_logprobs: Tensor | TopKLogprobs | None = None, beta: float = 0.5, skew: float = 0.1,
                       temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       num_chunks: int | None = None, fused: bool | None = None) -> Tensor:
    """`divergence` from hidden states → scalar; ``temperature`` divides both heads' logits (equals
    ``divergence(s/T, t/T, ...)``); cached ``teacher_logprobs`` are used as given."""
    _check_divergence_args(kind, beta, skew)

    def kernel(log_q: Tensor, log_p: Tensor) -> Tensor:
        return _divergence_terms(log_q, log_p, kind, beta, skew)

    plan = _plan_chunks(kernel, student_hidden, mask, [], teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                        teacher_logprobs=teacher_logprobs, need_teacher=True, temperature=temperature,
                        chunk_size=chunk_size, num_chunks=num_chunks, caller="chunked_divergence")
    return _chunked_loss(plan, student_head, _mean_coefficients(mask, plan.index), fused, "chunked_divergence")


class PolicyTerms(NamedTuple):
    """What `chunked_policy_loss` returns; all but ``loss`` are detached scalars for logging."""

    loss: Tensor  # pg_coef·pg_loss + kl_coef·single_step_kl, with gradient
    pg_loss: Tensor  # = ppo_clip_loss(token log-probs, ...)
    single_step_kl: Tensor | None  # = single_step_kl(...), None without a teacher
    clip_fraction: Tensor  # token mean of |ρ − 1| > clip_ratio, ρ = exp(log q − log q_old)·w


def chunked_policy_loss(student_hidden: Tensor, student_head: Head, tokens: Tensor, mask: Tensor, *,
                        old_logprobs: Tensor, advantages: Tensor, weights: Tensor | None = None,
                        clip_ratio: float | None = 0.2, temperature: float = 1.0, pg_coef: float = 1.0,
                        teacher_hidden: Tensor | None = None, teacher_head: Head | None = None,
                        teacher_logprobs: Tensor | TopKLogprobs | None = None, kl_coef: float = 1.0,
                        kl_weighted: bool = False,
                        chunk_size: int = DEFAULT_CHUNK_SIZE, num_chunks: int | None = None,
                        fused: bool | None = None) -> PolicyTerms:
    """The PPO term and the single-step KL of one micro-batch in one pass over the student's head.

    Equals ``pg_coef·ppo_clip_loss(lp, old_logprobs, advantages, mask, weights, clip_ratio) +
    kl_coef·single_step_kl(s/T, t/T, mask, weights if kl_weighted)`` with lp = ``token_logprobs(s, tokens, T)``
    (s, t: the student's and teacher's logits). Computing both from one head call per chunk saves the separate
    log-prob pass (its forward and, checkpointed, its recompute); fused, the whole head costs one forward and
    one backward. A zero coefficient drops its term from the gradient, not from the report (``minillm.long_range
    = false`` still logs the PPO term). Without teacher inputs the KL is skipped (``single_step_kl`` is None).
    Hidden states [B, L, H]; ``tokens``, ``mask``, ``old_logprobs``, ``advantages``, ``weights`` [B, L].
    """
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("tokens", tokens)):
        _check_shape(name, t, mask.shape, "chunked_policy_loss (mask.shape)")
    if weights is not None:
        _check_shape("weights", weights, mask.shape, "chunked_policy_loss (mask.shape)")
    with_teacher = teacher_hidden is not None or teacher_head is not None or teacher_logprobs is not None
    w = _upcast(weights).detach() if weights is not None else torch.ones(mask.shape, device=mask.device)
    extras = [tokens.long(), _upcast(old_logprobs).detach(), _upcast(advantages).detach(), w]

    def kernel(log_q: Tensor, log_p: Tensor | None, tok: Tensor, old: Tensor, adv: Tensor, w_c: Tensor) -> Tensor:
        lp = log_q.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        pg = _ppo_terms(lp, old, adv, torch.ones_like(lp), w_c, clip_ratio)
        kl = torch.zeros_like(pg) if log_p is None else _kl_terms(log_q, log_p) * (w_c if kl_weighted else 1.0)
        with torch.no_grad():
            ratio = torch.exp(lp - old) * w_c
            clipped = ((ratio - 1).abs() > clip_ratio).to(pg.dtype) if clip_ratio is not None else torch.zeros_like(pg)
        return torch.stack([pg, kl, clipped], -1)

    plan = _plan_chunks(kernel, student_hidden, mask, extras, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                        teacher_logprobs=teacher_logprobs, need_teacher=with_teacher, temperature=temperature,
                        chunk_size=chunk_size, num_chunks=num_chunks, caller="chunked_policy_loss")
    means = _mean_coefficients(mask, plan.index)
    scale = torch.tensor([pg_coef, kl_coef if with_teacher else 0.0, 0.0], dtype=means.dtype, device=means.device)
    loss, (pg, kl, clip_fraction) = _chunked_loss(plan, student_head, means[:, None] * scale, fused,
                                                  "chunked_policy_loss", report=means)
    return PolicyTerms(loss, pg, kl if with_teacher else None, clip_fraction)


class KDTerms(NamedTuple):
    """What `chunked_kd_loss` returns; ``ce`` and ``kd`` are detached scalars for logging."""

    loss: Tensor  # (1 − kd_ratio)·ce + kd_ratio·kd with a teacher, else ce; with gradient
    ce: Tensor  # = pt_loss(s, labels)
    kd: Tensor | None  # the KD term at the temperature; None without a teacher


def chunked_kd_loss(student_hidden: Tensor, student_head: Head, labels: Tensor, *,
                    teacher_hidden: Tensor | None = None, teacher_head: Head | None = None,
                    teacher_logprobs: Tensor | TopKLogprobs | None = None, kd_ratio: float = 0.5,
                    divergence: str = "fkl",
                    temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, num_chunks: int | None = None,
                    fused: bool | None = None) -> KDTerms:
    """The SFT/KD trainer's loss in one pass over the student's head: (1 − kd_ratio)·CE + kd_ratio·KD.

    CE = ``pt_loss(s, labels)``. KD at temperature T over the same positions (labels ≠ −100): the reference's
    ``pt_loss(s/T, labels, t/T, kd_ratio=1)`` = −Σ p_T log q_T for ``fkl``, else ``divergence(s/T, t/T, mask,
    kind)``. Both temperatures come from one head call per chunk: log_softmax is shift-invariant, so
    log_softmax(log_q / T) = log_softmax(s / T). Without teacher inputs: CE alone (``kd`` is None).
    """
    _check_divergence_args(divergence, beta, skew)
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"minillm.losses.chunked.chunked_kd_loss: kd_ratio={kd_ratio} must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"minillm.losses.chunked.chunked_kd_loss: temperature={temperature} must be > 0")
    with_teacher = teacher_hidden is not None or teacher_head is not None or teacher_logprobs is not None

    def kernel(log_q: Tensor, log_p: Tensor | None, lab: Tensor) -> Tensor:
        ce, _ = _pt_terms(log_q, None, lab)
        if log_p is None:
            return torch.stack([ce, torch.zeros_like(ce)], -1)
        if temperature != 1.0:
            log_q, log_p = _log_softmax(log_q / temperature), _log_softmax(log_p / temperature)
        kd = _pt_terms(log_q, log_p, lab)[1] if divergence == "fkl" else \
            _divergence_terms(log_q, log_p, divergence, beta, skew)
        return torch.stack([ce, kd], -1)

    valid = labels != IGNORE_INDEX
    plan = _plan_chunks(kernel, student_hidden, valid, [labels.long()], teacher_hidden=teacher_hidden,
                        teacher_head=teacher_head, teacher_logprobs=teacher_logprobs, need_teacher=with_teacher,
                        temperature=1.0, chunk_size=chunk_size, num_chunks=num_chunks, caller="chunked_kd_loss")
    means = _mean_coefficients(valid, plan.index)
    weights = [1.0 - kd_ratio, kd_ratio] if with_teacher else [1.0, 0.0]
    scale = torch.tensor(weights, dtype=means.dtype, device=means.device)
    loss, (ce, kd) = _chunked_loss(plan, student_head, means[:, None] * scale, fused, "chunked_kd_loss",
                                   report=means)
    return KDTerms(loss, ce, kd if with_teacher else None)
