"""The rollout record and the scoring phase of MiniLLM.

A rollout phase samples responses y ~ p̃ = (1−α)·q_θ + α·p (``minillm.generation.sampling``), then *scores* them once with
the frozen teacher and the old student: per-token log-probs, importance weights w_t = q_old/p̃, rewards
r_t = clip((log p − log q_old)/scale) and raw long-range returns. Everything is kept in a typed
:class:`Rollout` whose fields all have the same batch dimension, so a shuffled micro-batch is one index away.
Responses are padded to ``max_new_tokens`` columns, as the reference pads generation to max_length: whitening
over "every entry including padding" (the reference behaviour) depends on that width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .. import losses
from ..losses import chunked as chunked_losses
from ..losses.heads import sequence_inputs  # noqa: F401 — also part of this module's API


@dataclass
class Rollout:
    """A buffer of scored samples. B rows; P prompt columns (left-padded); L response columns."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with pad id
    prompt_mask: torch.Tensor  # [B, P] long, 1 on prompt tokens
    response_ids: torch.Tensor  # [B, L] long, pad after the first EOS
    response_mask: torch.Tensor  # [B, L] float, 1 up to and including the first EOS
    old_logprobs: torch.Tensor  # [B, L] float, log q_old(y_t | y_<t, x) of the sampling student, 0 where masked
    teacher_logprobs: torch.Tensor  # [B, L] float, log p(y_t | y_<t, x), 0 where masked
    weights: torch.Tensor  # [B, L] float, importance weight q_old/p̃ per token, 1 where masked
    rewards: torch.Tensor  # [B, L] float, clipped scaled log-ratio reward, 0 where masked
    returns: torch.Tensor  # [B, L] float, long-range advantages before whitening
    prompt_index: torch.Tensor  # [B] long, index of the prompt in the training prompt set
    # [B, L, H_t] teacher's last hidden states at the response positions (its LM head maps row t to the logits
    # predicting y_t), kept at scoring so the learn phase needs only the teacher's head; [B, L, 0] when not kept
    teacher_hidden: torch.Tensor = None

    def __post_init__(self) -> None:
        if self.teacher_hidden is None:
            self.teacher_hidden = self.response_ids.new_zeros((*self.response_ids.shape, 0), dtype=torch.float32)

    @property
    def has_teacher_hidden(self) -> bool:
        return self.teacher_hidden.shape[-1] > 0

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> "Rollout":
        return Rollout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Rollout":
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    @classmethod
    def cat(cls, parts: list["Rollout"]) -> "Rollout":
        width = max(p.prompt_ids.shape[1] for p in parts)
        padded = [p.left_pad_prompts(width) for p in parts]
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in padded]) for f in fields(cls)})

    def left_pad_prompts(self, width: int, pad_id: int = 0) -> "Rollout":
        extra = width - self.prompt_ids.shape[1]
        if extra <= 0:
            return self
        pad = self.prompt_ids.new_full((len(self), extra), pad_id)
        return Rollout(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                          "prompt_ids": torch.cat([pad, self.prompt_ids], 1),
                          "prompt_mask": torch.cat([torch.zeros_like(pad), self.prompt_mask], 1)})


def response_logits(model, prompt_ids, prompt_mask, response_ids, autocast=None) -> torch.Tensor:
    """[B, L, V] logits predicting each response token (row t predicts y_t), fp32."""
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids)
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        logits = model(**inputs).logits
    p, length = prompt_ids.shape[1], response_ids.shape[1]
    return logits[:, p - 1: p - 1 + length].float()


@torch.no_grad()
def score_samples(*, student, teacher, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
                  alpha: float, temperature: float, reward_scale: float, reward_clip: float, gamma: float,
                  length_norm: bool, include_current: bool,
                  trim: Callable[[torch.Tensor], torch.Tensor] = lambda x: x, autocast=None,
                  chunk_size: int | None = None, num_chunks: int | None = None,
                  keep_teacher_hidden: bool = False, reward_teacher_temperature: float | None = None) -> Rollout:
    """Score one batch of samples with teacher-forced forwards of both models (the reference's scoring).

    The old student's log-probs come from a fresh forward in the learning-phase layout rather than from the
    sampling loop's cache, so the PPO ratio of the first update is exactly 1. With ``chunk_size`` the log-probs
    come from hidden states + LM head, ``chunk_size`` positions at a time (``num_chunks``: the same head calls
    on every rank), so no [B, L, V] fp32 logits are ever held. ``keep_teacher_hidden`` (chunked only) keeps the
    teacher's response hidden states in the record: the teacher's distribution over a rollout does not change
    during a phase, so the single-step term of every PPO epoch can reuse them instead of re-running the teacher.

    ``reward_teacher_temperature``: the temperature of the teacher's log-prob inside the reward (None: ``temperature``,
    so the reward is the log-ratio of the two distributions the weights and the single-step term use). The official
    code's reward takes it at 1 whatever the sampling temperature (``minillm.reward_teacher_temperature: one``); the
    student's log q_old, the importance weights and the stored ``teacher_logprobs`` stay at ``temperature``.
    """
    mask = response_mask.float()
    if keep_teacher_hidden and chunk_size is None:
        raise ValueError("score_samples: keep_teacher_hidden needs chunk_size (the chunked path)")
    kept: dict[str, torch.Tensor] = {}

    def logprobs(model, temperatures: tuple[float, ...], keep: bool = False) -> list[torch.Tensor]:
        """The model's response log-probs at each temperature, from one forward."""
        if chunk_size is None:
            logits = trim(response_logits(model, prompt_ids, prompt_mask, response_ids, autocast))
            return [losses.token_logprobs(logits, response_ids, t) * mask for t in temperatures]
        from ..losses.heads import response_hidden

        hidden, head = response_hidden(model, prompt_ids, prompt_mask, response_ids, trim=trim, autocast=autocast)
        if keep:
            kept["teacher_hidden"] = hidden.detach()
        return [chunked_losses.chunked_token_logprobs(hidden, head, response_ids, mask, temperature=t,
                                                      chunk_size=chunk_size, num_chunks=num_chunks)
                for t in temperatures]

    (old,) = logprobs(student, (temperature,))
    reward_t = temperature if reward_teacher_temperature is None else reward_teacher_temperature
    teacher_lps = logprobs(teacher, (temperature,) if reward_t == temperature else (temperature, reward_t),
                           keep=keep_teacher_hidden)
    teacher_lp, reward_teacher_lp = teacher_lps[0], teacher_lps[-1]
    weights = losses.importance_weights(old, teacher_lp, mask, alpha)
    rewards = losses.token_rewards(reward_teacher_lp, old, mask, scale=reward_scale, clip=reward_clip)
    returns = losses.long_range_advantages(rewards, mask, gamma=gamma, length_norm=length_norm,
                                           include_current=include_current)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=mask,
                   old_logprobs=old, teacher_logprobs=teacher_lp, weights=weights, rewards=rewards,
                   returns=returns, prompt_index=prompt_index, **kept)


def pad_responses(response_ids: torch.Tensor, response_mask: torch.Tensor, width: int, pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad responses to ``width`` columns (the rollout buffer has one fixed response width)."""
    extra = width - response_ids.shape[1]
    if extra <= 0:
        return response_ids[:, :width], response_mask[:, :width]
    ids = torch.cat([response_ids, response_ids.new_full((response_ids.shape[0], extra), pad_id)], 1)
    mask = torch.cat([response_mask, response_mask.new_zeros((response_mask.shape[0], extra))], 1)
    return ids, mask
