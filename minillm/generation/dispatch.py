"""``rollout.engine``: one entry point over the three samplers of teacher-mixed rollouts.

It sits above the samplers (the speculative engine itself calls the fast one for α = 1), so neither sampler imports
the other's dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine import fast_mixed_sample
from .sampling import SampleOutput, mixed_sample
from .speculative import speculative_mixed_sample

__all__ = ["ENGINES", "sample_rollouts"]

ENGINES = ("naive", "fast", "speculative")


def sample_rollouts(engine: str, student: torch.nn.Module, teacher: torch.nn.Module | None, input_ids: Tensor,
                    attention_mask: Tensor, *, draft_tokens: int = 4, **kwargs) -> SampleOutput:
    """Dispatch on ``rollout.engine``: ``naive`` (:func:`~minillm.generation.sampling.mixed_sample`, both models
    every step), ``fast`` (:func:`~minillm.generation.engine.fast_mixed_sample`; ``score`` is passed through,
    ``static_cache``/``cuda_graphs`` too) or ``speculative``
    (:func:`~minillm.generation.speculative.speculative_mixed_sample`, ``draft_tokens`` per round; independent rows;
    eager only, so ``static_cache``/``cuda_graphs`` = None become False)."""
    if engine == "naive":
        for key in ("score", "static_cache", "cuda_graphs"):
            kwargs.pop(key, None)
        return mixed_sample(student, teacher, input_ids, attention_mask, **kwargs)
    if engine == "fast":
        return fast_mixed_sample(student, teacher, input_ids, attention_mask, **kwargs)
    if engine == "speculative":
        for key in ("static_cache", "cuda_graphs"):
            if kwargs.get(key) is None:
                kwargs[key] = False
        return speculative_mixed_sample(student, teacher, input_ids, attention_mask, draft_tokens=draft_tokens,
                                        **kwargs)
    raise ValueError(f"minillm.generation: unknown rollout engine {engine!r}; choose one of {', '.join(ENGINES)}")
