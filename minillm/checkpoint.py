"""Atomic checkpoints and the RNG/trainer state that exact resume needs.

Layout of ``output_dir/checkpoints/step-N/``: an HF ``save_pretrained`` folder (weights, config, tokenizer)
(a LoRA student, ``student.peft``: its peft adapter folder instead, the frozen base being ``student.path``)
plus ``optimizer.pt`` (local) or ``deepspeed/`` (DeepSpeed engine state), and ``trainer_state.pt``
(step counters, data cursors, RNG states, ...). A checkpoint is written into ``.tmp-step-N`` and renamed
when complete, so a crash never leaves a folder that resume would pick up half-written.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(_tuple_to_list(random.getstate())),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_list_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuple_to_list(x: Any) -> Any:
    return [_tuple_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _list_to_tuple(x: Any) -> Any:
    return tuple(_list_to_tuple(v) for v in x) if isinstance(x, list) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves are ignored."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume_dir(resume: str | None, output_dir: str | Path) -> Path | None:
    """``--resume`` with no value: the newest checkpoint of output_dir (an error when there is none); ``auto``: the
    same, or None (start fresh) when there is none yet, for job scripts that are requeued after preemption and
    always pass it; with a folder: that checkpoint folder, or the newest checkpoint of that run folder."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume in (None, "", "latest"):
        found = latest_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {checkpoint_root(output_dir)}")
        return found
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--resume {resume}: neither a checkpoint folder (with {STATE_FILE}) nor a run "
                                "folder with checkpoints/step-N")
    return found


class AtomicDir:
    """Write a folder under a temporary name, rename it into place when the block exits cleanly.

    Every rank enters the block (they all write their shards into the same temporary folder on shared
    storage); the strategy's barrier separates writing from the rename, which rank 0 does.
    """

    def __init__(self, final: str | Path, strategy) -> None:
        self.final = Path(final)
        self.tmp = self.final.parent / f".tmp-{self.final.name}"
        self.strategy = strategy

    def __enter__(self) -> Path:
        if self.strategy.is_main:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        self.strategy.barrier()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if issubclass(exc_type, OSError) and self.strategy.is_main:
                # a full disk or a write error: the half-written folder is of no use and holds space the next
                # save needs. Other failures leave it for inspection; resume ignores it either way.
                shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.strategy.barrier()
        if self.strategy.is_main:
            if self.final.exists():
                old = self.final.parent / f".old-{self.final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
        self.strategy.barrier()


def prune_checkpoints(output_dir: str | Path, keep: int, is_main: bool) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (at least the newest one; -1: keep all), oldest
    first, after the new one is complete (save_checkpoint calls this after the rename).

    Each folder is first renamed out of the ``step-N`` namespace, then deleted: ``rmtree`` removes files in no
    particular order, and a kill during it could otherwise leave a ``step-N`` that still has its
    trainer_state.pt but lost weights, which resume would pick as complete.

    Leftovers of killed runs go too, whatever ``keep`` says: ``.delete-*`` (a kill during this deletion),
    ``.old-*`` (during a rename over an existing step) and ``.tmp-step-*`` (during a save; resume ignores them,
    but one may hold a full copy of weights and optimizer state). No save is in progress when this runs."""
    if not is_main:
        return
    root = checkpoint_root(output_dir)
    for _, path in list_checkpoints(output_dir)[:-max(keep, 1)] if keep >= 0 else ():
        trash = path.parent / f".delete-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for pattern in (".delete-*", ".old-step-*", ".tmp-step-*"):
        for leftover in root.glob(pattern) if root.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)


def save_trainer_state(directory: Path, state: dict[str, Any], is_main: bool) -> None:
    if is_main:
        torch.save(state, directory / STATE_FILE)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
