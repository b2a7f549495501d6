"""The ranking alternative of the MiniLLM paper (``minillm.objective: ranking``), used by ``MiniLLMTrainer``.

The slides ("Without PPO?", Alternative #2) replace RL by ranking: (1) sample several responses from the student,
(2) rank them by the teacher probability p(y|x), (3) minimise

    J(θ) = max(0, δ − log q_θ(y⁺|x) + log q_θ(y⁻|x)) − λ·log q_θ(y*|x).

Our reading, since the slides do not define every symbol:

* each prompt is sampled **twice** in the rollout phase (the prompt batch is duplicated row by row, so a phase of
  ``rollout.num_rollouts`` samples covers half as many prompts); y⁺ is the sample the teacher scores higher,
  y⁻ the other; the score is the teacher's log p(y|x) from the scoring phase (a per-token mean with
  ``minillm.ranking_length_norm``, which then also applies to the student's log-likelihoods);
* y* (the term that "stabilises training in RLHF works", as in RRHF's SFT term) is the training record's
  reference response by default (``ranking_anchor: reference``); when ``data.train`` is a SeqKD file that is the
  teacher's own sample. ``ranking_anchor: best`` uses y⁺ instead (no ground truth needed);
* samples come from ``rollout`` settings; the slides' ablation used no teacher mix-in (α = 0), as the shipped
  configs do. Importance weights, rewards and advantages are computed by the scoring phase but unused.

Micro-batches must hold whole pairs: the buffer is permuted pair by pair (:func:`pair_permutation`) and the
micro-batch size is even (``RunConfig.resolve`` checks).
"""

from __future__ import annotations

from typing import Any

import torch

from ..losses import chunked as chunked_losses
from .. import losses
from ..losses.heads import global_chunk_count, hidden_and_head, response_hidden
from ..generation.rollout import Rollout, response_logits
from .common import to_device


def duplicate_prompts(batch: dict[str, Any]) -> dict[str, Any]:
    """A prompt batch with every row repeated twice in place (rows 2i and 2i+1 are prompt i)."""
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "index"):
        out[key] = batch[key].repeat_interleave(2, dim=0)
    out["references"] = [ref for ref in batch["references"] for _ in range(2)]
    return out


def pair_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``n`` (even) rows that keeps the pairs (2i, 2i+1) adjacent and in order."""
    pairs = torch.randperm(n // 2, generator=generator)
    return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).reshape(-1)


def _reference_positions(trainer) -> dict[int, int]:
    cached = getattr(trainer, "_ranking_reference_positions", None)
    if cached is None:
        cached = {ex.index: pos for pos, ex in enumerate(trainer.data.train.examples)}
        trainer._ranking_reference_positions = cached
    return cached


def reference_logprobs(trainer, prompt_index: torch.Tensor) -> torch.Tensor:
    """log q_θ(y_ref|x) (or its per-token mean) of the training records ``prompt_index`` [N] → [N], with gradient."""
    cfg, strategy = trainer.cfg, trainer.strategy
    m, temperature = cfg.minillm, cfg.rollout.temperature
    positions = _reference_positions(trainer)
    batch = trainer.data.sft_collator([trainer.data.train[positions[int(i)]] for i in prompt_index.tolist()])
    batch = to_device(batch, strategy.device)
    labels = batch["labels"]
    mask = labels != losses.IGNORE_INDEX
    tokens = labels.clamp(min=0)
    if m.chunked_losses:
        hidden, head = hidden_and_head(trainer.student, batch["input_ids"], batch["attention_mask"],
                                       trim=trainer._trim, autocast=strategy.autocast)
        logprobs = chunked_losses.chunked_token_logprobs(hidden, head, tokens, mask, temperature=temperature,
                                                 chunk_size=m.loss_chunk_size,
                                                 num_chunks=global_chunk_count(mask, m.loss_chunk_size, strategy))
    else:
        with strategy.autocast():
            logits = trainer.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = losses.token_logprobs(trainer._trim(logits.float()), tokens, temperature)
    return losses.sequence_logprobs(logprobs, mask, m.ranking_length_norm)


def ranking_micro_batch_loss(trainer, mb: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
    """J (plus ptx_coef·L_PT) for one micro-batch of pairs of the rollout buffer."""
    strategy, m, r = trainer.strategy, trainer.cfg.minillm, trainer.cfg.rollout
    if len(mb) % 2 or not torch.equal(mb.prompt_index[0::2], mb.prompt_index[1::2]):
        raise RuntimeError("minillm.objective=ranking: a micro-batch does not hold whole pairs of samples of the "
                           "same prompt (rows 2i and 2i+1)")
    mask = mb.response_mask
    if m.chunked_losses:
        hidden, head = response_hidden(trainer.student, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                                       trim=trainer._trim, autocast=strategy.autocast)
        logprobs = chunked_losses.chunked_token_logprobs(hidden, head, mb.response_ids, mask, temperature=r.temperature,
                                                 chunk_size=m.loss_chunk_size,
                                                 num_chunks=global_chunk_count(mask, m.loss_chunk_size, strategy))
    else:
        logits = trainer._trim(response_logits(trainer.student, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                                               strategy.autocast))
        logprobs = losses.token_logprobs(logits, mb.response_ids, r.temperature)
    student = losses.sequence_logprobs(logprobs, mask, m.ranking_length_norm).view(-1, 2)  # [N, 2]
    teacher = losses.sequence_logprobs(mb.teacher_logprobs, mask, m.ranking_length_norm).view(-1, 2)
    first_wins = teacher[:, 0] >= teacher[:, 1]
    if m.ranking_anchor == "reference":
        anchor = reference_logprobs(trainer, mb.prompt_index[0::2])
    else:
        anchor = torch.where(first_wins, student[:, 0], student[:, 1])
    loss = losses.ranking_loss(student, teacher, anchor, margin=m.ranking_margin, anchor_coef=m.ranking_anchor_coef)
    with torch.no_grad():
        pos = torch.where(first_wins, student[:, 0], student[:, 1])
        neg = torch.where(first_wins, student[:, 1], student[:, 0])
        parts = {"ranking_loss": float(loss.detach()),
                 "ranking_hinge": float(torch.clamp(m.ranking_margin - pos + neg, min=0).mean()),
                 "ranking_anchor_logprob": float(anchor.detach().mean()),
                 "ranking_agreement": float((pos > neg).float().mean())}  # student already prefers y⁺
    if trainer.use_pt:
        pt = trainer._chunked_pt_loss(to_device(trainer._next_pt_batch(), strategy.device), m.loss_chunk_size)
        loss = loss + m.ptx_coef * pt
        parts["pt_loss"] = float(pt.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts
