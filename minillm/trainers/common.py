"""The trainers' shared toolbox: functions and small classes, not a base class.

Both trainers use the same NaN guard, phase timer, checkpoint/resume helpers and dev evaluation; each
trainer keeps its own explicit loop.
"""

from __future__ import annotations

import contextlib
import errno
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import (AtomicDir, latest_checkpoint, load_trainer_state, prune_checkpoints, rng_state,
                          save_trainer_state, set_rng_state)
from ..errors import CheckpointError, UserError
from ..tracking import get_logger
from .preemption import StopControl

log = get_logger()


class NonFiniteLossError(UserError, RuntimeError):
    """Too many optimizer steps had a non-finite loss or gradient."""


class NanGuard:
    """Skip and count micro-batches whose loss is not finite on any rank; abort past a limit.

    The flag is all-reduced so every rank skips the same micro-batch, and the strategy's ``skip_micro_step``
    still runs a (zero) backward, so every rank runs the same collectives (under ZeRO a rank that skipped
    backward while another ran it would deadlock in the gradient reduction). Optimizer steps DeepSpeed drops
    for a non-finite gradient count too, but not fp16 loss-scale overflows above the minimum scale.
    """

    def __init__(self, strategy, limit: int) -> None:
        self.strategy = strategy
        self.limit = limit
        self.skipped = 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        return float(self.strategy.all_reduce(bad, "max")) == 0.0

    def record_skip(self, what: str, step: int) -> None:
        self.skipped += 1
        log.warning("step %d: non-finite %s, skipped (%d/%d)", step, what, self.skipped, self.limit)
        if self.skipped > self.limit:
            raise NonFiniteLossError(f"{self.skipped} non-finite {what}s exceed train.max_nan_skips={self.limit}; "
                                     "lower the learning rate or check the data")


class PhaseTimer:
    """Wall time per named phase since the last ``pop``; synchronises CUDA so GPU time is attributed."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals.clear()
        return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def mean_over_ranks(strategy, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over data-parallel ranks (one all-reduce for the whole dict)."""
    if strategy.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    strategy.all_reduce(t, "sum")
    return {k: float(v) / strategy.world_size for k, v in zip(keys, t.tolist())}


class MetricWindow:
    """Sums of per-micro-batch metrics since the last logged step.

    The sums are part of the checkpoint, so that a resumed run logs the same averages as an uninterrupted
    one even when a checkpoint falls between two logging steps.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0

    def add(self, parts: dict[str, float], tokens: int = 0) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.tokens += tokens

    def mean(self, key: str) -> float:
        return self.sums[key] / max(1, self.count)

    def pop(self, prefix: str = "train/") -> dict[str, float]:
        """Averages (``prefix`` + name) and a fresh window."""
        out = {prefix + k: v / max(1, self.count) for k, v in self.sums.items()}
        self.sums, self.count, self.tokens = {}, 0, 0
        return out

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count, self.tokens = dict(state["sums"]), int(state["count"]), int(state["tokens"])


class BestTracker:
    """Remembers the best dev metric; ``rougeL`` is maximised, ``loss`` minimised.

    ``metric`` (``train.select_best_by``) picks ``best/``. Every dev metric the run computes (Rouge-L, loss) is also
    tracked on its own, for ``best-rougeL/`` and ``best-loss/``: the official recipes pick the baselines by dev
    Rouge-L but MiniLLM's initialisation by dev loss, so a run exports both. After :meth:`update`, ``improved``
    lists the metrics that reached a new best at that step."""

    KEYS = {"rougeL": "dev/rougeL", "loss": "dev/loss"}

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.best: float | None = None
        self.best_step: int | None = None
        self.each: dict[str, tuple[float, int]] = {}  # metric → (best value, its step)
        self.improved: list[str] = []

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True when ``best/`` (the selection metric) improved."""
        self.improved = []
        for name, key in self.KEYS.items():
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                continue
            old = self.each.get(name)
            if old is None or (value > old[0] if name == "rougeL" else value < old[0]):
                self.each[name] = (value, step)
                self.improved.append(name)
        if self.metric == "none" or self.metric not in self.improved:
            return False
        self.best, self.best_step = self.each[self.metric]
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step,
                "each": {k: [v, s] for k, (v, s) in self.each.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.each = {k: (v, s) for k, (v, s) in state.get("each", {}).items()}


def save_checkpoint(directory: Path, strategy, tokenizer, state: dict, keep: int, output_dir: Path,
                    extra: dict[str, Any] | None = None) -> None:
    """Atomic step checkpoint: HF folder + optimizer/engine state + trainer state + per-rank RNG.

    ``extra`` maps file names to objects this rank saves too (e.g. its share of the rollout buffer).

    A write error (a full disk: ENOSPC, permissions) on any rank is agreed on by all of them (no rank is left
    waiting at the rename's barrier), the half-written folder is removed, older checkpoints are not pruned, and
    a CheckpointError names the checkpoint that is still complete.
    """
    previous = latest_checkpoint(output_dir)
    try:
        with AtomicDir(directory, strategy) as tmp:
            failure: OSError | None = None
            try:
                strategy.save_checkpoint(tmp, tokenizer)
                save_trainer_state(tmp, state, strategy.is_main)
                torch.save(rng_state(), tmp / f"rng-rank{strategy.rank}.pt")
                for name, obj in (extra or {}).items():
                    torch.save(obj, tmp / name)
            except OSError as error:
                failure = error
            if _any_rank(strategy, failure is not None):
                raise failure or OSError(errno.EIO, "another rank could not write its part")
    except OSError as error:
        still = (f"{previous} is still complete; free space (or fix the permissions) and continue from it with "
                 "--resume auto") if previous is not None and previous != directory else \
            "there is no earlier checkpoint; free space (or fix the permissions) and restart"
        raise CheckpointError(f"cannot write checkpoint {directory}: {error}; {still}") from error
    prune_checkpoints(output_dir, keep, strategy.is_main)
    log.info("saved checkpoint %s", directory)


def _any_rank(strategy, flag: bool) -> bool:
    if strategy.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=strategy.device)
    return float(strategy.all_reduce(t, "max")[0]) > 0


def load_checkpoint(directory: Path, strategy) -> dict:
    """Restore engine/optimizer state and this rank's RNG; return the trainer state."""
    state = load_trainer_state(directory)
    if state["world_size"] != strategy.world_size:  # data cursors, RNG and buffers are per rank
        raise CheckpointError(f"{directory}: saved with {state['world_size']} ranks, resuming with "
                              f"{strategy.world_size}; exact resume needs the same world size")
    strategy.load_checkpoint(directory)
    rng_file = directory / f"rng-rank{strategy.rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; was the checkpoint written with a different world size?")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def export_model(directory: Path, strategy, model, tokenizer) -> None:
    """An HF folder (best/ or final/), written atomically."""
    with AtomicDir(directory, strategy) as tmp:
        strategy.save_hf(model, tokenizer, tmp)


def guarded_micro_step(trainer, loss: torch.Tensor, parts: dict[str, float], tokens: int = 0,
                       phases: tuple[str | None, str | None] = (None, None)):
    """One micro-step of either trainer: backward (skipped and counted when the loss is not finite on some
    rank), the metrics window, then ``strategy.step()``; an optimizer step whose gradient norm is not finite
    is skipped by the strategy and counted here. ``phases`` names the timer phases of backward and step
    (None: not timed separately, e.g. inside an enclosing phase). Returns the strategy's StepResult."""
    strategy, guard = trainer.strategy, trainer.nan_guard
    backward_phase, step_phase = phases
    if guard.all_finite(loss):
        with trainer.timer(backward_phase) if backward_phase else contextlib.nullcontext():
            strategy.backward(loss)
        trainer.window.add(parts, tokens=tokens)
    else:
        strategy.skip_micro_step(loss)
        guard.record_skip("loss", trainer.step + 1)
    with trainer.timer(step_phase) if step_phase else contextlib.nullcontext():
        result = strategy.step()
    # fp16 loss-scale overflows above the minimum scale are routine (the scaler lowers the scale and retries):
    # counting them would abort healthy fp16 runs at train.max_nan_skips
    if result.stepped and result.skipped and not result.overflow:
        guard.record_skip("gradient", trainer.step + 1)
    return result


def evaluate_and_select(trainer) -> dict[str, float]:
    """Dev evaluation at the current step: log it, and export best/ when the selection metric improved."""
    with trainer.timer("eval"):
        metrics = trainer.evaluate()
    if not metrics:
        return metrics
    trainer.metrics.log(trainer.step, metrics)
    log.info("step %d: %s", trainer.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    selected = trainer.best.update(metrics, trainer.step)
    with trainer.timer("save"):
        for name in trainer.best.improved:  # best-rougeL/, best-loss/: each metric's own best checkpoint
            export_model(trainer.output_dir / f"best-{name}", trainer.strategy, trainer.student, trainer.tokenizer)
        if selected:  # best/ by train.select_best_by: a copy of the folder just written, not a second export
            copy_export(trainer.output_dir / f"best-{trainer.best.metric}", trainer.output_dir / "best",
                        trainer.strategy)
    return metrics


def copy_export(source: Path, directory: Path, strategy) -> None:
    """``directory`` becomes a copy of the exported folder ``source`` (rank 0 copies, atomically; all ranks wait)."""
    import shutil

    with AtomicDir(directory, strategy) as tmp:
        if strategy.is_main:
            shutil.copytree(source, tmp, dirs_exist_ok=True)


def train_under_stop_control(trainer, resume_from) -> dict[str, Any]:
    """``trainer._train(resume_from)`` with a :class:`minillm.trainers.preemption.StopControl` installed: a stop
    signal or ``train.max_time`` ends it with a checkpoint of the exact position, and the result holds ``stopped``
    (the reason). Both trainers' ``train`` is this."""
    with StopControl(trainer.strategy, trainer.cfg.train.max_time_seconds()) as trainer.stopper:
        try:
            return trainer._train(resume_from)
        finally:
            trainer.stopper = None  # run_phase or save called later (notebooks, benchmarks) have no stop control


def stop_early(trainer, bar) -> dict[str, Any]:
    """``train.stop_at_step``: checkpoint (unless this step was just saved) and return as if interrupted."""
    return _stop(trainer, bar, "train.stop_at_step")


def stop_gracefully(trainer, bar, reason: str) -> dict[str, Any]:
    """A signal or ``train.max_time`` (minillm.trainers.preemption): checkpoint the exact position (unless this
    step was just saved) and return; ``stopped`` tells the CLI to exit with EXIT_PREEMPTED."""
    return {**_stop(trainer, bar, reason), "stopped": reason}


def _stop(trainer, bar, reason: str) -> dict[str, Any]:
    if bar is not None:
        bar.close()
    if getattr(trainer, "saved_step", None) != trainer.step:
        trainer.save()
    trainer.metrics.close()
    log.info("stopped at step %d (%s); continue with --resume auto", trainer.step, reason)
    return {"step": trainer.step, "stopped_early": True}
