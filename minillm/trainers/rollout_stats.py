"""Helpers of the MiniLLM trainer kept apart so minillm/trainers/minillm.py stays a readable size: dropout
removal for RL, and the phase's rollout statistics (sums all-reduced over ranks, then means)."""

from __future__ import annotations

import re

import torch

from .. import losses
from ..generation.rollout import Rollout


_DROPOUT_NAME = re.compile(r"(dropout|layerdrop|layer_drop|drop_path|pdrop|drop_rate|dropout_rate)", re.IGNORECASE)


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout-like rate of ``model`` to 0, whatever the family calls it; returns what was changed.

    Covers every ``nn.Dropout``-family module, every float attribute of a submodule whose name looks like a dropout,
    layer-drop or drop-path rate (OPT keeps ``activation_dropout`` and ``layerdrop`` as plain floats read in
    forward, Llama ``attention_dropout``), and the same names on the model's config, which some implementations
    read at forward time."""
    changed: list[str] = []
    for name, sub in model.named_modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd):
            if sub.p:
                changed.append(f"{name or 'model'}.p")
            sub.p = 0.0
        for attr, value in list(vars(sub).items()):
            if isinstance(value, float) and not isinstance(value, bool) and value and _DROPOUT_NAME.search(attr):
                setattr(sub, attr, 0.0)
                changed.append(f"{name or 'model'}.{attr}")
    configs = [getattr(model, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in {id(c): c for c in configs if c is not None}.values():
        for attr, value in list(vars(config).items()):
            if isinstance(value, float) and value and _DROPOUT_NAME.search(attr):
                setattr(config, attr, 0.0)
                changed.append(f"config.{attr}")
    return changed


_TOKEN_METRICS = ("reward", "teacher_logprob", "student_logprob", "weight")


def rollout_totals(buffer: Rollout, tokens: float) -> torch.Tensor:
    """This rank's phase sums, [len(_TOKEN_METRICS) + 4] float64 on the buffer's device: Σ reward, teacher and
    student log-prob and importance weight over response tokens, Σ k3 per row, response tokens, all tokens (prompt +
    response) and rows. Sums (not means) so that an all-reduce gives the exact means over every rank's tokens.

    Every element is made on the buffer's device: a CPU scalar stacked with CUDA sums is an error on a GPU."""
    mask = buffer.response_mask
    device = mask.device
    k3 = losses.k3_reverse_kl(buffer.old_logprobs, buffer.teacher_logprobs, mask)
    token_values = (buffer.rewards, buffer.teacher_logprobs, buffer.old_logprobs, buffer.weights)
    counts = torch.tensor([float(tokens), float(len(buffer))], dtype=torch.float64, device=device)
    sums = torch.stack([(v * mask).sum() for v in token_values] + [k3.sum(), mask.sum()]).double()
    return torch.cat([sums, counts])


def rollout_statistics(totals: torch.Tensor) -> dict[str, float]:
    """The logged ``rollout/*`` means from (all-reduced) :func:`rollout_totals`."""
    *sums, k3_sum, response_tokens, all_tokens, rows = totals.double().cpu()
    stats = {k: v / response_tokens.clamp(min=1) for k, v in zip(_TOKEN_METRICS, sums)}
    stats.update(reverse_kl_k3=k3_sum / rows.clamp(min=1), response_length=response_tokens / rows.clamp(min=1),
                 tokens=all_tokens)
    return {f"rollout/{k}": float(v) for k, v in stats.items()}
