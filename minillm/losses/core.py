"""The loss functions of MiniLLM (DESIGN §4): pure tensor functions, no module state.

Conventions
-----------
* ``B`` batch, ``L`` response (or label) length, ``V`` vocabulary, ``H`` hidden size.
* ``logits[b, t]`` are the already-shifted logits that predict ``tokens[b, t]``.
* ``mask`` is bool or float ``[B, L]``; a *token mean* is Σ(x·mask)/Σmask over the whole batch and is exactly
  0 (not NaN) when Σmask = 0. Values at masked positions never leak into a result, even when they are inf/NaN.
* p is the teacher, q (q_θ) the student; no gradient ever flows into a teacher tensor.
* Every reduction runs in at least fp32: fp16/bf16 inputs are upcast, fp64 inputs stay fp64 (so the exactness
  tests can run in double precision). Functions work on any device and keep no state.

Reference vs paper
------------------
The defaults reproduce the official implementation (lmops-notes §2); switches give the paper's equations:

=============================  =====================================  ==========================================
quantity                        reference (default)                    paper
=============================  =====================================  ==========================================
return                          ``include_current=True``, γ = 0.95     ``include_current=False``, γ = 1
length normalisation            ``length_norm=True``                   ``length_norm=True`` (ablation: False)
advantage whitening             ``whiten(..., mask=None)``             none
reward                          (log p − log q)/0.5, clip ±100         ``scale=1, clip=None``
single-step importance weight   ``weights=None``                       ``weights=w`` (eq. 7)
PT loss                         ``kd_ratio=0.5`` (half word-level KD)  ``kd_ratio=0`` (LM loss only)
=============================  =====================================  ==========================================

Correctness note
----------------
With ``include_current=True`` (the reference) the long-range term already holds a sampled estimate of the
current step's KL gradient and the single-step term adds its exact value again, so the update is *not* the
gradient of the sequence-level reverse KL. With ``include_current=False``, γ = 1, no length normalisation, no
whitening, α = 0 and no clipping, the expected update of Σ_t [−A_t·ρ_t + KL_t] (per-sequence *sums*) **is**
∇KL(q_θ‖p) = (∇J)_Single + (∇J)_Long (the paper's gradient decomposition). ``tests/test_exactness.py``
proves this by enumeration.

The memory-lean twins of the vocabulary-wide losses (hidden states + LM head, chunk by chunk) live in
:mod:`minillm.losses.chunked`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor

__all__ = ["IGNORE_INDEX", "DIVERGENCES", "masked_mean", "token_logprobs", "response_mask", "mix_probs",
           "importance_weights", "token_rewards", "long_range_advantages", "whiten", "k3_reverse_kl",
           "ppo_clip_loss", "single_step_kl", "pt_loss", "divergence", "sequence_logprobs", "ranking_loss"]

IGNORE_INDEX = -100
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "sfkl", "srkl")


# ----------------------------------------------------------------------------------------------- helpers
def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16/int → fp32; fp32 and fp64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_shape(name: str, x: Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"minillm.losses: `{name}` has shape {tuple(x.shape)} but {what} needs {tuple(shape)}")


def _log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    x = _upcast(logits)
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_v a_v (log a_v − log b_v) over the last axis, with 0·log 0 = 0 (vocabulary entries a_v = 0 add nothing).

    The `where` keeps −inf − (−inf) = NaN out of both the value and the gradient.
    """
    diff = torch.where(torch.isfinite(log_a), log_a - log_b, torch.zeros_like(log_a))
    return (log_a.exp() * diff).sum(-1)


def _cross_entropy_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """−Σ_v p_v log q_v over the last axis, skipping entries with p_v = 0."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_q, torch.zeros_like(log_q))).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b), computed in log space; exact at the endpoints w = 0 and w = 1."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _divergence_terms(log_q: Tensor, log_p: Tensor, kind: str, beta: float, skew: float) -> Tensor:
    """Per-position divergence between q (student) and p (teacher) over the last axis; see `divergence`."""
    if kind == "fkl":
        return _kl_terms(log_p, log_q)
    if kind == "rkl":
        return _kl_terms(log_q, log_p)
    if kind == "jsd":
        # The ends are the limits of the β-normalised JSD (GKD's and TRL's convention): JSD_β/β → KL(p‖q) as β → 0
        # and JSD_β/(1−β) → KL(q‖p) as β → 1. The unnormalised JSD is identically 0 there and would train nothing.
        if beta <= 0.0:
            return _kl_terms(log_p, log_q)
        if beta >= 1.0:
            return _kl_terms(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if kind == "sfkl":
        return _kl_terms(log_p, _log_mix(log_p, log_q, skew))
    if kind == "srkl":
        return _kl_terms(log_q, _log_mix(log_q, log_p, skew))
    raise ValueError(f"minillm.losses.divergence: unknown kind {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def _check_divergence_args(kind: str, beta: float, skew: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"minillm.losses.divergence: unknown kind {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"minillm.losses.divergence: beta={beta} must lie in [0, 1]")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"minillm.losses.divergence: skew={skew} must lie in [0, 1)")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Token mean Σ(x·mask)/Σmask (x, mask: same shape) → scalar, or per slice along ``dim``.

    Exactly 0 where Σmask = 0; masked entries of x never leak in, even when they are inf/NaN.
    """
    _check_shape("mask", mask, x.shape, "masked_mean (same shape as x)")
    x = _upcast(x)
    m = mask.to(x.dtype)
    masked = torch.where(mask != 0, x * m, torch.zeros_like(x))
    total, count = (masked.sum(), m.sum()) if dim is None else (masked.sum(dim), m.sum(dim))
    return total / torch.where(count > 0, count, torch.ones_like(count))


# ------------------------------------------------------------------------------------ per-token quantities
def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits/T)[tokens]: logits [B, L, V], tokens [B, L] long in [0, V) → [B, L] (≥ fp32).

    Computed as gathered logit − logsumexp, so no second [B, L, V] log-prob tensor is kept.
    """
    _check_shape("tokens", tokens, logits.shape[:-1], "token_logprobs (logits.shape[:-1])")
    x = _upcast(logits)
    if temperature != 1.0:
        x = x / temperature
    return x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def response_mask(response: Tensor, eos_token_id: int | Sequence[int] | Tensor) -> Tensor:
    """Float [B, L] mask of a sampled response [B, L]: 1 up to and including the first EOS, 0 after; all 1 if no EOS.

    The first EOS is a scored target (lmops-notes §2.1). ``eos_token_id`` may be one id or several (chat
    models often stop on more than one token).
    """
    eos = torch.as_tensor(eos_token_id, device=response.device).reshape(-1)
    is_eos = torch.isin(response, eos).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before t
    return (eos_before == 0).float()


def mix_probs(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    """Teacher-mixed distribution p̃ = (1−α)·softmax(student) + α·softmax(teacher) (paper: teacher-mixed sampling).

    Logits [..., V] (same shape) → probabilities [..., V].
    """
    _check_shape("teacher_logits", teacher_logits, student_logits.shape, "mix_probs (student_logits.shape)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"minillm.losses.mix_probs: alpha={alpha} must lie in [0, 1]")
    q = torch.softmax(_upcast(student_logits), dim=-1)
    p = torch.softmax(_upcast(teacher_logits.detach()), dim=-1)
    return (1.0 - alpha) * q + alpha * p


def importance_weights(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """w_t = q(y_t)/p̃(y_t) = q/((1−α)q + αp) per token, [B, L] → [B, L]; 1 where mask = 0 (paper: the per-token
    approximation of the importance weight of teacher-mixed sampling).

    Evaluated as 1/((1−α) + α·e^{log p − log q}) so that tiny probabilities neither underflow nor give 0/0.
    Exactly 1 everywhere when α = 0.
    """
    _check_shape("teacher_logprobs", teacher_logprobs, student_logprobs.shape, "importance_weights")
    _check_shape("mask", mask, student_logprobs.shape, "importance_weights")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"minillm.losses.importance_weights: alpha={alpha} must lie in [0, 1]")
    lq, lp = _upcast(student_logprobs), _upcast(teacher_logprobs)
    ones = torch.ones_like(lq)
    if alpha == 0.0:
        return ones
    w = 1.0 / ((1.0 - alpha) + alpha * torch.exp(lp - lq))
    return torch.where(mask != 0, w, ones)


def token_rewards(teacher_logprobs: Tensor, student_logprobs: Tensor, mask: Tensor, scale: float = 0.5,
                  clip: float | None = 100.0) -> Tensor:
    """r_t = clip((log p(y_t) − log q(y_t))/scale, −clip, clip), 0 where mask = 0; [B, L] → [B, L].

    The per-token reward of the reverse-KL policy gradient (paper: r_t = log p/q_θ); ``clip=None`` disables clipping.
    """
    _check_shape("student_logprobs", student_logprobs, teacher_logprobs.shape, "token_rewards")
    _check_shape("mask", mask, teacher_logprobs.shape, "token_rewards")
    r = (_upcast(teacher_logprobs) - _upcast(student_logprobs)) / scale
    if clip is not None:
        r = r.clamp(-clip, clip)
    return torch.where(mask != 0, r, torch.zeros_like(r))


def long_range_advantages(rewards: Tensor, mask: Tensor, gamma: float = 0.95, length_norm: bool = True,
                          include_current: bool = True) -> Tensor:
    """Long-range returns [B, L] → [B, L], 0 where mask = 0 (paper: R_{t+1}, R^Norm; lmops-notes §2.4).

    * ``include_current=True`` (reference): R_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'}.
    * ``include_current=False`` (paper): the return of the *next* step, R_{t+1} = Σ_{t' > t} γ^{t'−t−1} r_{t'}.
    * ``length_norm``: divide by the number of valid tokens summed over (t' ≥ t, or t' > t); 0 where that is 0.
    Rewards at masked positions are ignored.
    """
    _check_shape("mask", mask, rewards.shape, "long_range_advantages")
    r = _upcast(rewards)
    valid = mask != 0
    r = torch.where(valid, r, torch.zeros_like(r))
    steps = torch.arange(r.shape[-1], device=r.device)
    gap = steps[None, :] - steps[:, None]  # gap[t, t'] = t' − t
    discount = torch.where(gap >= 0, torch.tensor(float(gamma), dtype=r.dtype, device=r.device)
                           ** gap.clamp(min=0).to(r.dtype), torch.zeros((), dtype=r.dtype, device=r.device))
    returns = r @ discount.T  # R_t = Σ_t' D[t, t'] r_t'
    counts = valid.to(r.dtype).flip(-1).cumsum(-1).flip(-1)  # valid tokens in t..L−1
    if not include_current:  # shift left by one: position t gets R_{t+1} and the count of t+1..L−1
        returns = torch.nn.functional.pad(returns[..., 1:], (0, 1))
        counts = torch.nn.functional.pad(counts[..., 1:], (0, 1))
    if length_norm:
        returns = torch.where(counts > 0, returns / torch.where(counts > 0, counts, torch.ones_like(counts)),
                              torch.zeros_like(returns))
    return torch.where(valid, returns, torch.zeros_like(returns))


def whiten(values: Tensor, mask: Tensor | None = None, eps: float = 1e-8,
           all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x − μ)/sqrt(σ² + eps) with the population variance; any shape → same shape.

    ``mask=None`` takes the statistics over every entry, padding included (the reference); with a mask, over
    valid entries only (all entries are transformed either way). ``all_reduce`` combines ranks: it is called
    once with the float64 tensor [Σx, Σx², n] and must return its element-wise sum over data-parallel ranks
    (e.g. ``lambda t: strategy.all_reduce(t, "sum")``). When no entry is valid anywhere the result is 0.
    """
    x = _upcast(values)
    x64 = x.double()
    if mask is None:
        valid = torch.ones_like(x64)
    else:
        _check_shape("mask", mask, values.shape, "whiten")
        valid = (mask != 0).double()
        x64 = torch.where(mask != 0, x64, torch.zeros_like(x64))
    stats = torch.stack([x64.sum(), (x64 * x64).sum(), valid.sum()])
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, total_sq, count = stats.unbind()
    n = torch.where(count > 0, count, torch.ones_like(count))
    mean = total / n
    var = (total_sq / n - mean * mean).clamp(min=0.0)
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var + eps).to(x.dtype)
    return torch.where(count > 0, out, torch.zeros_like(out))


def k3_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence, length-normalised k3 estimate of KL(q‖p) from samples of q: [B, L] → [B].

    k3_t = e^{d_t} − 1 − d_t with d_t = log p(y_t) − log q(y_t) (unbiased and ≥ 0); averaged over each row's
    valid tokens, 0 for an empty row. This is the reference's logged reverse-KL metric.
    """
    _check_shape("teacher_logprobs", teacher_logprobs, student_logprobs.shape, "k3_reverse_kl")
    _check_shape("mask", mask, student_logprobs.shape, "k3_reverse_kl")
    d = _upcast(teacher_logprobs) - _upcast(student_logprobs)
    d = torch.where(mask != 0, d, torch.zeros_like(d))
    return masked_mean(torch.expm1(d) - d, mask, dim=-1)


# ---------------------------------------------------------------------------------------------- the losses
def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  weights: Tensor | None = None, clip_ratio: float | None = 0.2) -> Tensor:
    """PPO-clipped long-range surrogate → scalar (paper Algorithm 1, lmops-notes §2.5).

    ρ_t = exp((log q_θ − log q_old)·mask)·w_t, the token mean of max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)).
    The importance weight is clipped *together* with the ratio, never on its own. Only ``logprobs`` [B, L]
    carries gradient; old log-probs, advantages and weights ([B, L] each) are constants. ``clip_ratio=None``
    turns clipping off.
    """
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        _check_shape(name, t, logprobs.shape, "ppo_clip_loss (logprobs.shape)")
    if weights is not None:
        _check_shape("weights", weights, logprobs.shape, "ppo_clip_loss (logprobs.shape)")
    return masked_mean(_ppo_terms(logprobs, old_logprobs, advantages, mask, weights, clip_ratio), mask)


def _ppo_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, weights: Tensor | None,
               clip_ratio: float | None) -> Tensor:
    """Per position max(−A ρ, −A clip(ρ)) of `ppo_clip_loss` (any shape; the token mean is the caller's)."""
    lp = _upcast(logprobs)
    log_ratio = torch.where(mask != 0, lp - _upcast(old_logprobs).detach(), torch.zeros_like(lp))
    ratio = log_ratio.exp()
    if weights is not None:
        ratio = ratio * _upcast(weights).detach()
    adv = _upcast(advantages).detach()
    loss = -adv * ratio
    if clip_ratio is not None:
        loss = torch.maximum(loss, -adv * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio))
    return loss


def single_step_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0,
                   weights: Tensor | None = None) -> Tensor:
    """Single-step term (∇J)_Single: token mean of KL(q_θ(·|y_<t) ‖ p(·|y_<t)) over the full vocabulary → scalar.

    Logits [B, L, V] (both divided by T), mask [B, L]. The gradient flows through q analytically (through both
    q and log q); vocabulary entries where q = 0 (−inf student logits) add nothing. ``weights`` [B, L]
    multiplies each position's KL by w_t as in paper eq. 7 (the reference passes none).
    """
    _check_shape("teacher_logits", teacher_logits, student_logits.shape, "single_step_kl (student_logits.shape)")
    _check_shape("mask", mask, student_logits.shape[:-1], "single_step_kl (student_logits.shape[:-1])")
    kl = _kl_terms(_log_softmax(student_logits, temperature),
                            _log_softmax(teacher_logits.detach(), temperature))
    if weights is not None:
        _check_shape("weights", weights, kl.shape, "single_step_kl (mask.shape)")
        kl = kl * _upcast(weights).detach()
    return masked_mean(kl, mask)


def _pt_terms(log_q: Tensor, log_p: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-position CE(labels) and −Σ p log q; labels equal to IGNORE_INDEX are gathered at 0 (masked later)."""
    ce = -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return ce, (_cross_entropy_terms(log_p, log_q) if log_p is not None else None)


def _combine_pt(ce: Tensor, kd: Tensor | None, valid: Tensor, kd_ratio: float) -> Tensor:
    if kd is None:
        return masked_mean(ce, valid)
    loss = kd_ratio * masked_mean(kd, valid)
    if kd_ratio < 1.0:  # skip the CE term entirely at kd_ratio = 1 (0·inf would be NaN)
        loss = loss + (1.0 - kd_ratio) * masked_mean(ce, valid)
    return loss


def pt_loss(student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
            kd_ratio: float = 0.5) -> Tensor:
    """Pre-training loss (paper §2.3 L_PT, lmops-notes §2.7) → scalar.

    (1−kd_ratio)·CE(labels) + kd_ratio·(−Σ_v p_v log q_v), both token means over labels ≠ −100; plain CE when
    no teacher logits are given. Logits [B, L, V], labels [B, L] (already shifted), no temperature.
    """
    _check_shape("labels", labels, student_logits.shape[:-1], "pt_loss (student_logits.shape[:-1])")
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"minillm.losses.pt_loss: kd_ratio={kd_ratio} must lie in [0, 1]")
    log_p = None
    if teacher_logits is not None:
        _check_shape("teacher_logits", teacher_logits, student_logits.shape, "pt_loss (student_logits.shape)")
        log_p = _log_softmax(teacher_logits.detach())
    ce, kd = _pt_terms(_log_softmax(student_logits), log_p, labels)
    return _combine_pt(ce, kd, labels != IGNORE_INDEX, kd_ratio)


def divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, kind: str, beta: float = 0.5,
               skew: float = 0.1) -> Tensor:
    """Token mean of a word-level divergence between q (student) and p (teacher) → scalar.

    Logits [B, L, V], mask [B, L]. ``kind``: ``fkl`` KL(p‖q); ``rkl`` KL(q‖p); ``jsd`` β·KL(p‖m)+(1−β)·KL(q‖m)
    with m = βp+(1−β)q for 0 < β < 1, and at the ends the limits of the normalised JSD (as in GKD/TRL): β = 0 is
    KL(p‖q) (forward), β = 1 is KL(q‖p) (reverse); ``tvd`` ½Σ|p−q|; ``sfkl`` KL(p ‖ skew·p+(1−skew)·q); ``srkl`` KL(q ‖ skew·q+(1−skew)·p).
    """
    _check_divergence_args(kind, beta, skew)
    _check_shape("teacher_logits", teacher_logits, student_logits.shape, "divergence (student_logits.shape)")
    _check_shape("mask", mask, student_logits.shape[:-1], "divergence (student_logits.shape[:-1])")
    terms = _divergence_terms(_log_softmax(student_logits), _log_softmax(teacher_logits.detach()), kind, beta, skew)
    return masked_mean(terms, mask)


# ------------------------------------------------------------------------------ sequence-level (ranking alternative)
def sequence_logprobs(logprobs: Tensor, mask: Tensor, length_norm: bool = False) -> Tensor:
    """log q(y|x) = Σ_t log q(y_t|y_<t, x) per row: logprobs, mask [B, L] → [B] (≥ fp32).

    ``length_norm``: the per-token mean instead (0 for a row with no valid token). Masked entries never leak in.
    """
    if length_norm:
        return masked_mean(logprobs, mask, dim=-1)
    _check_shape("mask", mask, logprobs.shape, "sequence_logprobs (same shape as logprobs)")
    x = _upcast(logprobs)
    return torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros_like(x)).sum(-1)


def ranking_loss(student_logprobs: Tensor, teacher_scores: Tensor, anchor_logprobs: Tensor, margin: float = 1.0,
                 anchor_coef: float = 1.0) -> Tensor:
    """The MiniLLM paper's ranking alternative to policy gradient (slides "Alternative #2: Ranking Loss") → scalar.

    Two student samples per prompt, N prompts:

    * ``student_logprobs`` [N, 2]: log q_θ(y|x) of both samples (with gradient; see :func:`sequence_logprobs`);
    * ``teacher_scores`` [N, 2]: the teacher's score of each sample, log p(y|x) (no gradient); the sample with the
      higher score is y⁺, the other y⁻ (a tie picks the first as y⁺);
    * ``anchor_logprobs`` [N]: log q_θ(y*|x) of the anchor response (the reference, or y⁺ itself).

    J = mean_n [ max(0, δ − log q(y⁺) + log q(y⁻)) − λ·log q(y*) ], δ = ``margin``, λ = ``anchor_coef``. The hinge
    is 0 (and passes no gradient) once the student prefers y⁺ by at least δ nats.
    """
    if student_logprobs.dim() != 2 or student_logprobs.shape[1] != 2:
        raise ValueError(f"minillm.losses.ranking_loss: student_logprobs must be [N, 2], got "
                         f"{tuple(student_logprobs.shape)}")
    _check_shape("teacher_scores", teacher_scores, student_logprobs.shape, "ranking_loss (student_logprobs.shape)")
    _check_shape("anchor_logprobs", anchor_logprobs, student_logprobs.shape[:1], "ranking_loss ([N])")
    if margin < 0 or anchor_coef < 0:
        raise ValueError(f"minillm.losses.ranking_loss: margin={margin} and anchor_coef={anchor_coef} must be >= 0")
    lp = _upcast(student_logprobs)
    first_wins = (teacher_scores.detach()[:, 0] >= teacher_scores.detach()[:, 1])
    pos = torch.where(first_wins, lp[:, 0], lp[:, 1])
    neg = torch.where(first_wins, lp[:, 1], lp[:, 0])
    hinge = torch.clamp(margin - pos + neg, min=0.0)
    return (hinge - anchor_coef * _upcast(anchor_logprobs)).mean()
