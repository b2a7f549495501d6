"""The paper's evaluation analyses beyond Rouge-L: calibration, exposure bias and the reference LM loss.

* **Calibration** (MiniLLM §3.3, ECE on SST-2 / BoolQ): the model scores each answer option of a
  classification prompt, the probabilities are normalised over the options, and the expected calibration
  error is measured with equal-width confidence bins. :func:`expected_calibration_error` and
  :func:`calibration_bins` are pure; :func:`choice_confidences` and :func:`calibration_report` run a model.
* **Exposure bias** (MiniLLM §3.3, ExAccErr after Arora et al. 2022): per-position forward KL between teacher
  and student is accumulated over prefixes sampled from the student (free run, R(l)) and compared with the
  per-step error on prefixes sampled from the teacher (oracle, ε(l)). :func:`exposure_bias_curve` and
  :func:`per_position_forward_kl` are pure; :func:`exposure_bias` runs both models.
* **Reference LM loss** (logged by the reference evaluation, lmops-notes §5): token-mean teacher-forced
  cross-entropy of the gold responses, tokenised exactly like the SFT data (DESIGN §3).

Every number here is a plain fraction or nat value unless a docstring says "×100". Model helpers run under
``torch.no_grad`` in eval mode and restore the model's training flag afterwards.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..losses.heads import sequence_inputs

__all__ = [
    "calibration_bins",
    "expected_calibration_error",
    "choice_confidences",
    "calibration_report",
    "per_position_forward_kl",
    "exposure_bias_curve",
    "response_forward_kl",
    "exposure_bias",
    "reference_lm_loss",
]


# ============================================================================================ helpers
def _as_1d(values: Any, dtype: torch.dtype) -> Tensor:
    # Python floats go straight to `dtype` (float64 here) so that no float32 rounding creeps in.
    t = values if isinstance(values, Tensor) else torch.as_tensor(values, dtype=dtype)
    return t.detach().cpu().reshape(-1).to(dtype)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less wrapper; run where the inputs are
        return torch.device("cpu")


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens (no BOS), as the training data and the evaluation prompts are."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _pad_id(tokenizer) -> int:
    # Any id is fine: padded slots are masked out of attention and of every sum below.
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` [B, T] and position ids (0.. on every row)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}


def _token_logprobs(model, batch: dict[str, Tensor]) -> Tensor:
    """[B, T-1] fp32 log-prob of token t+1 given tokens ≤ t (teacher-forced); garbage on padded columns."""
    logits = model(**batch).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class _EvalMode:
    """``with _EvalMode(model):`` eval mode inside, the previous training flag restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, bool(getattr(model, "training", False))

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False


# ============================================================================================ calibration
def calibration_bins(confidences: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor,
                     n_bins: int = 10) -> list[dict[str, Any]]:
    """Per-bin table of a reliability diagram with ``n_bins`` equal-width bins over [0, 1].

    Bin b covers [b/n, (b+1)/n); the last bin is closed, so a confidence of exactly 1.0 falls in it.
    Returns one dict per bin: ``lower``, ``upper``, ``count``, ``accuracy`` (fraction correct) and
    ``confidence`` (mean confidence); the last two are ``None`` for an empty bin.
    """
    conf = _as_1d(confidences, torch.float64)
    hit = _as_1d(correct, torch.float64)
    if conf.numel() != hit.numel():
        raise ValueError(f"calibration: {conf.numel()} confidences but {hit.numel()} correctness flags")
    if conf.numel() == 0:
        raise ValueError("calibration: no predictions given")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"calibration: n_bins must be a positive integer, got {n_bins!r}")
    if not bool(torch.isfinite(conf).all()) or conf.min() < 0 or conf.max() > 1:
        raise ValueError("calibration: confidences must be probabilities in [0, 1]")
    if not bool(((hit == 0) | (hit == 1)).all()):
        raise ValueError("calibration: `correct` must hold booleans (0/1)")
    index = (conf * n_bins).floor().long().clamp(max=n_bins - 1)
    table = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        table.append({
            "lower": b / n_bins,
            "upper": (b + 1) / n_bins,
            "count": count,
            "accuracy": float(hit[members].mean()) if count else None,
            "confidence": float(conf[members].mean()) if count else None,
        })
    return table


def expected_calibration_error(confidences: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor,
                               n_bins: int = 10) -> float:
    """ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over equal-width bins (see :func:`calibration_bins`).

    ``confidences`` [N] is the probability the model gave its predicted answer, ``correct`` [N] whether that
    answer was right. Returns a plain fraction in [0, 1] (multiply by 100 for the percentage some papers
    print). Perfectly calibrated bins contribute 0; empty bins contribute nothing.
    """
    table = calibration_bins(confidences, correct, n_bins)
    total = sum(row["count"] for row in table)
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
                     for row in table if row["count"]))


@torch.no_grad()
def choice_confidences(model, tokenizer, prompts: Sequence[str], options: Sequence[str],
                       batch_size: int = 8) -> Tensor:
    """[N, K] fp32: the model's probability of each of the K ``options`` as the continuation of each prompt.

    For prompt x and option o (both tokenised without special tokens, o's tokens placed right after x's),
    score(x, o) = Σ_j log q(o_j | x, o_<j); the scores are normalised over the options with a softmax, so each
    row sums to 1. Options are written exactly as they should follow the prompt (mind a leading space for BPE
    vocabularies, e.g. " positive"). All N·K sequences are scored in right-padded batches of ``batch_size``
    with explicit position ids, so the tokenizer's own padding side does not matter.
    """
    if not prompts:
        raise ValueError("choice_confidences: no prompts given")
    if len(options) < 2:
        raise ValueError(f"choice_confidences: need at least two options to choose from, got {list(options)!r}")
    if batch_size < 1:
        raise ValueError(f"choice_confidences: batch_size must be ≥ 1, got {batch_size}")
    prompt_ids = _encode(tokenizer, prompts)
    option_ids = _encode(tokenizer, options)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"choice_confidences: prompt {i} tokenises to nothing; the first option token "
                             "needs a context to be predicted from")
    for k, ids in enumerate(option_ids):
        if not ids:
            raise ValueError(f"choice_confidences: option {k} ({options[k]!r}) tokenises to nothing")
    pairs = [(i, k) for i in range(len(prompt_ids)) for k in range(len(option_ids))]
    scores = torch.empty(len(pairs), dtype=torch.float32)
    device, pad = _model_device(model), _pad_id(tokenizer)
    with _EvalMode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start: start + batch_size]
            batch = right_pad([prompt_ids[i] + option_ids[k] for i, k in chunk], pad, device)
            logprobs = _token_logprobs(model, batch).cpu()
            for row, (i, k) in enumerate(chunk):
                # Column t of `logprobs` scores token t+1, so option token j (at len(x)+j) is column len(x)+j−1.
                first = len(prompt_ids[i]) - 1
                scores[start + row] = logprobs[row, first: first + len(option_ids[k])].sum()
    return torch.softmax(scores.view(len(prompt_ids), len(option_ids)), dim=-1)


def _label_indices(labels: Sequence[int | str] | Tensor, options: Sequence[str]) -> Tensor:
    out = []
    for n, label in enumerate(labels.tolist() if isinstance(labels, Tensor) else labels):
        if isinstance(label, str):
            if label not in options:
                raise ValueError(f"calibration_report: label {n} ({label!r}) is not one of the options "
                                 f"{list(options)!r}")
            out.append(list(options).index(label))
        else:
            if not 0 <= int(label) < len(options):
                raise ValueError(f"calibration_report: label {n} ({label!r}) is not an option index "
                                 f"0..{len(options) - 1}")
            out.append(int(label))
    return torch.tensor(out, dtype=torch.long)


def calibration_report(model, tokenizer, prompts: Sequence[str], options: Sequence[str],
                       labels: Sequence[int | str] | Tensor, n_bins: int = 10, batch_size: int = 8
                       ) -> dict[str, Any]:
    """Accuracy and ECE of the argmax option (labels: option indices or option strings).

    Returns ``{"ece", "accuracy", "n", "bins"}``; ``ece`` and ``accuracy`` are fractions in [0, 1],
    ``bins`` is :func:`calibration_bins`' table.
    """
    if len(labels) != len(prompts):
        raise ValueError(f"calibration_report: {len(prompts)} prompts but {len(labels)} labels")
    target = _label_indices(labels, options)
    probs = choice_confidences(model, tokenizer, prompts, options, batch_size=batch_size)
    confidence, prediction = probs.max(dim=-1)
    correct = prediction == target
    return {
        "ece": expected_calibration_error(confidence, correct, n_bins),
        "accuracy": float(correct.double().mean()),
        "n": len(prompts),
        "bins": calibration_bins(confidence, correct, n_bins),
    }


# ============================================================================================ exposure bias
def per_position_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """[B, L] fp32 forward KL(p_t ‖ q_t) = Σ_v p_t(v)(log p_t(v) − log q_t(v)), exact over the vocabulary.

    ``student_logits`` (q) and ``teacher_logits`` (p) are [B, L, V] with the same V (cut padded vocabulary
    rows off first). Entries with p_t(v) = 0 add nothing. Positions with ``mask`` [B, L] = 0 are 0 (by
    selection, so NaN logits on padded slots cannot leak in).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(f"per_position_forward_kl: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} must both be [B, L, V] with the same shape; "
                         "cut both to the tokenizer's vocabulary size first")
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    diff = torch.where(torch.isfinite(log_p), log_p - log_q, torch.zeros_like(log_p))
    kl = (log_p.exp() * diff).sum(-1)
    if mask is None:
        return kl
    if mask.shape != kl.shape:
        raise ValueError(f"per_position_forward_kl: mask {tuple(mask.shape)} must be [B, L] = {tuple(kl.shape)}")
    return torch.where(mask.to(kl.device) > 0, kl, torch.zeros_like(kl))


def _position_means(kl: Tensor, mask: Tensor, width: int, name: str) -> tuple[Tensor, Tensor]:
    """Mean over the sequences valid at each position (0 where none is) and the valid counts, float64 [width]."""
    if kl.dim() != 2 or mask.shape != kl.shape:
        raise ValueError(f"exposure_bias_curve: `{name}` KL {tuple(kl.shape)} and mask {tuple(mask.shape)} "
                         "must both be [N, L]")
    valid = (mask.detach().cpu() > 0)
    values = torch.where(valid, kl.detach().cpu().double(), torch.zeros((), dtype=torch.float64))
    counts = valid.sum(0).double()
    means = values.sum(0) / counts.clamp(min=1)
    pad = width - means.numel()
    return (torch.nn.functional.pad(means, (0, pad)), torch.nn.functional.pad(counts, (0, pad)))


def exposure_bias_curve(kl_free: Tensor, mask_free: Tensor, kl_oracle: Tensor, mask_oracle: Tensor
                        ) -> dict[str, Tensor]:
    """ExAccErr(l) for l = 1..L (MiniLLM §3.3, Arora et al. 2022), from per-position forward KL tables.

    ``kl_free`` [N, L1] holds KL(p_t ‖ q_t) on prefixes sampled from the student, ``kl_oracle`` [M, L2] on
    prefixes sampled from the teacher; masks mark valid positions. With KL̄_t the mean over the sequences
    valid at position t:

        R(l)  = Σ_{t≤l} KL̄_t^free                 (accumulated error when the student feeds itself)
        ε(l)  = (1/l) Σ_{t≤l} KL̄_t^oracle          (per-step error on gold-like prefixes)
        ExAccErr(l) = (R(l) − l·ε(l)) / (l·ε(l)) × 100   (percent excess error due to exposure bias)

    A position where no sequence is valid contributes 0 to the sums (the mean over an empty set is taken as
    0), and L = max(L1, L2). ExAccErr is NaN where l·ε(l) = 0. Returns float64 tensors [L]: ``l``, ``R``,
    ``eps``, ``ex_acc_err`` and the valid counts ``n_free``, ``n_oracle`` (to cut the curve where they thin).
    """
    width = max(kl_free.shape[-1], kl_oracle.shape[-1])
    free, n_free = _position_means(kl_free, mask_free, width, "free")
    oracle, n_oracle = _position_means(kl_oracle, mask_oracle, width, "oracle")
    steps = torch.arange(1, width + 1, dtype=torch.float64)
    accumulated = free.cumsum(0)
    oracle_total = oracle.cumsum(0)  # = l·ε(l)
    ex_acc_err = torch.where(oracle_total > 0, (accumulated - oracle_total) / oracle_total.clamp(min=1e-300) * 100,
                             torch.full_like(oracle_total, math.nan))
    return {"l": steps, "R": accumulated, "eps": oracle_total / steps, "ex_acc_err": ex_acc_err,
            "n_free": n_free, "n_oracle": n_oracle}


@torch.no_grad()
def response_forward_kl(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                        response_mask: Tensor, batch_size: int = 8, vocab_size: int | None = None) -> Tensor:
    """[N, L] fp32 KL(p_t ‖ q_t) at each response position, from teacher-forced forwards of both models.

    Inputs follow the rollout layout: ``prompt_ids``/``prompt_mask`` [N, P] left-padded, ``response_ids``
    [N, L] starting at column P, ``response_mask`` [N, L] 1 on real response tokens (up to and including
    EOS). Row t compares the two next-token distributions that predict y_t. ``vocab_size`` cuts both models'
    logits to the tokenizer's vocabulary (needed when the output layers are padded differently).
    """
    n, width = prompt_ids.shape
    if prompt_mask.shape != prompt_ids.shape or response_ids.shape[0] != n or response_mask.shape != response_ids.shape:
        raise ValueError(f"response_forward_kl: prompt ids {tuple(prompt_ids.shape)}, prompt mask "
                         f"{tuple(prompt_mask.shape)}, response ids {tuple(response_ids.shape)} and response mask "
                         f"{tuple(response_mask.shape)} must be [N, P], [N, P], [N, L], [N, L]")
    if width == 0:
        raise ValueError("response_forward_kl: prompts are empty; the first response token needs a context")
    length = response_ids.shape[1]
    out = torch.zeros((n, length), dtype=torch.float32)
    s_dev, t_dev = _model_device(student), _model_device(teacher)
    with _EvalMode(student), _EvalMode(teacher):
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            inputs = sequence_inputs(prompt_ids[rows], prompt_mask[rows].long(), response_ids[rows])
            # Column P−1+t predicts response token t.
            s_logits = student(**{k: v.to(s_dev) for k, v in inputs.items()}).logits[:, width - 1: width - 1 + length]
            t_logits = teacher(**{k: v.to(t_dev) for k, v in inputs.items()}).logits[:, width - 1: width - 1 + length]
            t_logits = t_logits.to(s_logits.device)
            if vocab_size is not None:
                s_logits, t_logits = s_logits[..., :vocab_size], t_logits[..., :vocab_size]
            elif s_logits.shape[-1] != t_logits.shape[-1]:
                raise ValueError(f"response_forward_kl: student has {s_logits.shape[-1]} output rows, teacher "
                                 f"{t_logits.shape[-1]}; pass vocab_size=len(tokenizer) to compare the shared part")
            mask = response_mask[rows].to(s_logits.device)
            out[rows] = per_position_forward_kl(s_logits, t_logits, mask).cpu()
    return out


_SEQUENCE_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


def _fields(source: Any, name: str) -> list[Tensor]:
    """The four sequence tensors of a mapping (e.g. ``Rollout.state_dict()``) or an object (a ``Rollout``)."""
    got = []
    for key in _SEQUENCE_FIELDS:
        value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
        if value is None:
            raise ValueError(f"exposure_bias: `{name}` lacks `{key}`; pass a mapping or object with "
                             f"{', '.join(_SEQUENCE_FIELDS)}")
        got.append(value)
    return got


def exposure_bias(student, teacher, free_run: Any, oracle: Any, batch_size: int = 8,
                  vocab_size: int | None = None) -> dict[str, Tensor]:
    """ExAccErr curve of ``student`` against ``teacher`` (see :func:`exposure_bias_curve`).

    ``free_run`` holds responses sampled from the student, ``oracle`` responses sampled from the teacher, for
    the same kind of prompts; each is a mapping or object with ``prompt_ids``, ``prompt_mask``,
    ``response_ids`` and ``response_mask`` in the rollout layout (a :class:`minillm.generation.rollout.Rollout` works).
    Both models are run teacher-forced on both sets; the result also carries the tables ``kl_free`` [N, L1]
    and ``kl_oracle`` [M, L2].
    """
    p_ids, p_mask, r_ids, r_mask = _fields(free_run, "free_run")
    kl_free = response_forward_kl(student, teacher, p_ids, p_mask, r_ids, r_mask, batch_size, vocab_size)
    mask_free = r_mask
    p_ids, p_mask, r_ids, r_mask = _fields(oracle, "oracle")
    kl_oracle = response_forward_kl(student, teacher, p_ids, p_mask, r_ids, r_mask, batch_size, vocab_size)
    curve = exposure_bias_curve(kl_free, mask_free, kl_oracle, r_mask)
    return {**curve, "kl_free": kl_free, "kl_oracle": kl_oracle}


# ============================================================================================ reference LM loss
@torch.no_grad()
def reference_lm_loss(model, tokenizer, prompts: Sequence[str], references: Sequence[str], batch_size: int = 8,
                      max_length: int = 512) -> float:
    """Token-mean teacher-forced cross-entropy (nats) of the references given the prompts.

    Tokenised like the SFT data (DESIGN §3): prompt ids = encode(prompt), full = encode(prompt + reference) +
    [EOS], sequence = (prompt ids + full[len(prompt ids):])[:max_length]; the loss covers the response tokens
    and EOS only and is averaged over all such tokens of all examples (not per example). An example left with
    no response token after truncation is skipped; if all are, a ValueError is raised.
    """
    if len(prompts) != len(references):
        raise ValueError(f"reference_lm_loss: {len(prompts)} prompts but {len(references)} references")
    if not all(isinstance(r, str) for r in references):
        raise ValueError("reference_lm_loss: each reference must be one string (pick the first of a list)")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("reference_lm_loss: the tokenizer has no EOS token; references are scored with EOS appended")
    prompt_ids = _encode(tokenizer, prompts)
    full_ids = _encode(tokenizer, [p + r for p, r in zip(prompts, references)])
    items = []  # (sequence, prompt length)
    for ids, full in zip(prompt_ids, full_ids):
        # The response is what follows the prompt's token count in the joint encoding, as in training.
        sequence = (ids + (full + [int(eos)])[len(ids):])[:max_length]
        if len(ids) >= 1 and len(sequence) > len(ids):
            items.append((sequence, len(ids)))
    if not items:
        raise ValueError("reference_lm_loss: no example has a response token left (empty prompts or prompts of "
                         f"≥ max_length={max_length} tokens)")
    total, count = 0.0, 0
    device, pad = _model_device(model), _pad_id(tokenizer)
    with _EvalMode(model):
        for start in range(0, len(items), batch_size):
            chunk = items[start: start + batch_size]
            logprobs = _token_logprobs(model, right_pad([s for s, _ in chunk], pad, device)).double().cpu()
            for row, (sequence, prompt_len) in enumerate(chunk):
                # Columns prompt_len−1 .. len−2 predict the response tokens and EOS.
                total -= float(logprobs[row, prompt_len - 1: len(sequence) - 1].sum())
                count += len(sequence) - prompt_len
    return total / count
