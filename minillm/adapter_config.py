"""``student.peft``: the LoRA adapter section of a model config (the adapter itself: :mod:`minillm.adapters`).

Kept apart from :mod:`minillm.config` so that file stays a readable size; like it, this module imports only the
standard library, so ``--help`` and ``--dry-run`` stay fast and need no ``peft``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .config_io import _f


@dataclass
class PeftConfig:
    """Train a LoRA adapter instead of the whole student (through the ``peft`` library: ``pip install
    minillm-distill[peft]``). Only the adapter (and ``modules_to_save``) get gradients and optimizer state; step
    checkpoints hold the adapter, ``final/`` and ``best*/`` are merged HF folders and ``final/adapter/`` the
    adapter alone. Teachers take no adapter section: give an adapter folder as ``teacher.path`` instead."""

    method: Literal["none", "lora"] = _f("none", "none: train every weight; lora: train a LoRA adapter only.")
    r: int = _f(8, "LoRA rank.")
    alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = _f(0.0, "Dropout on the adapter's input. 0 keeps a rollout's log-probs reproducible by the "
                        "training forward (MiniLLM's PPO ratio starts at exactly 1).")
    target_modules: Optional[list[str]] = _f(
        None, "Module names (last name component, e.g. [q_proj, v_proj]) that get an adapter; [all-linear]: every "
        "linear layer but the LM head. null: peft's default for the architecture (llama: q_proj, v_proj). Names "
        "that match no module of the model fail at load time with the list of names that exist.")
    modules_to_save: list[str] = _f([], "Modules trained in full beside the adapter and saved with it (e.g. [lm_head] "
                               "or [embed_tokens]); the LM head and embeddings stay frozen unless named here.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")

    def check(self, key: str, fail) -> None:
        """Field checks; ``fail(key, message)`` raises the caller's ConfigError."""
        if self.method == "none":
            return
        if self.r < 1:
            fail(f"{key}.r", f"must be >= 1, got {self.r}")
        if self.alpha <= 0:
            fail(f"{key}.alpha", f"must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
        for name, value in (("target_modules", self.target_modules or []), ("modules_to_save", self.modules_to_save)):
            bad = [v for v in value if not isinstance(v, str) or not v]
            if bad:
                fail(f"{key}.{name}", f"must be a list of module names, got {bad[0]!r}")
        if self.target_modules is not None and not self.target_modules:
            fail(f"{key}.target_modules", "is empty: name the modules that get an adapter, or null for peft's default")
        if "all-linear" in (self.target_modules or []) and len(self.target_modules) > 1:
            fail(f"{key}.target_modules", "all-linear stands alone (it already names every linear layer)")
