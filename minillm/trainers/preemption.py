"""Graceful stops: SIGTERM, SIGINT and SIGUSR1, and the ``train.max_time`` wall-time budget.

A cluster that preempts a job (or reaches its wall limit) sends a signal and kills the job some time later
(SLURM: ``--signal=TERM@120`` gives 120 s). The trainers install :class:`StopControl` for the length of
``train()``: the signal handler only records the signal, and the loop asks :meth:`StopControl.should_stop` at
every optimizer-step boundary, and MiniLLM also between the generation batches of a rollout (sampling a phase can
take minutes; the checkpoint is then the phase start, with the RNG and prompt cursor of that moment). The answer
is all-reduced (max) over ranks, so every rank stops at the same point even when only some got the signal or
their clocks disagree. The trainer then writes a checkpoint of that
exact position (mid-phase for MiniLLM: the rollout buffer and the PPO position are part of it) and returns; the
command exits with :data:`EXIT_PREEMPTED`, and ``--resume auto`` continues to the same weights and metrics as an
uninterrupted run.

Why at optimizer-step boundaries and not after any micro-step: a checkpoint between micro-steps would have to
hold half-accumulated gradients (DeepSpeed keeps them in its own partitioned buffers), so the current optimizer
step's remaining micro-steps are finished first.

Further signals while stopping (a second Ctrl-C, the scheduler repeating SIGTERM) are reported and ignored: the
checkpoint is written into a temporary folder and renamed when complete (minillm.checkpoint.AtomicDir), so even
the SIGKILL that follows an overrun leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable, Iterator

import torch

# sysexits.h EX_TEMPFAIL: "try again later". The run stopped on a signal or train.max_time after writing a
# checkpoint of its exact position; `minillm-train ... --resume auto` continues it. A job script can requeue on it.
EXIT_PREEMPTED = 75

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)

_REASON_TIME, _REASON_SIGNAL = 1.0, 2.0  # max over ranks: a signal wins


def _clock() -> float:
    return time.monotonic()


def process_age() -> float:
    """Seconds since this process started (the scheduler's clock starts before Python imports torch); 0 when the
    platform does not say."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StopControl:
    """Signal handlers and the wall-time budget of one ``train()`` call; a context manager.

    ``max_time_s``: stop when the remaining budget (counted from the process start) would not cover the longest
    interval seen between two step boundaries (a step, with its rollout, evaluation or periodic save) plus the
    longest checkpoint save, with a 50 % margin. ``clock`` is injectable for tests.
    """

    def __init__(self, strategy, max_time_s: float | None = None, clock: Callable[[], float] | None = None,
                 started: float | None = None) -> None:
        self.strategy = strategy
        self.max_time_s = max_time_s
        self.clock = clock or _clock
        self.started = started if started is not None else self.clock() - process_age()
        self.signal: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._last_check = self.clock()
        self._longest_step = 0.0
        self._longest_save = 0.0

    # -- handlers ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "StopControl":
        if threading.current_thread() is threading.main_thread():  # signal.signal only works there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._last_check = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Only record: the loop acts at the next step boundary. os.write, not logging: a handler may run while
        # the main thread is inside a logging call.
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            message = f"minillm: {name} received: checkpointing after the current optimizer step, then exiting\n"
        else:
            message = f"minillm: {name} received again: already stopping (the checkpoint is written atomically)\n"
        try:
            os.write(2, message.encode())
        except OSError:
            pass

    # -- decisions --------------------------------------------------------------------------------------------
    def note_save(self, seconds: float) -> None:
        self._longest_save = max(self._longest_save, seconds)

    def _over_budget(self, now: float) -> bool:
        if not self.max_time_s:
            return False
        save = self._longest_save or self._longest_step  # no save timed yet: assume one costs a step
        return (now - self.started) + 1.5 * (self._longest_step + save) >= self.max_time_s

    def should_stop(self, boundary: bool = True) -> str | None:
        """At a step boundary, on every rank (a collective when there are several): why to stop now, or None.
        ``boundary=False``: a check between generation batches of a rollout, which does not time a step."""
        now = self.clock()
        if boundary:
            self._longest_step = max(self._longest_step, now - self._last_check)
            self._last_check = now
        local = _REASON_SIGNAL if self.signal is not None else _REASON_TIME if self._over_budget(now) else 0.0
        if self.strategy.world_size > 1:
            flag = torch.tensor([local], dtype=torch.float32, device=self.strategy.device)
            local = float(self.strategy.all_reduce(flag, "max")[0])
        if local == 0.0:
            return None
        if local == _REASON_SIGNAL:
            self.reason = f"signal {signal.Signals(self.signal).name}" if self.signal is not None \
                else "a signal on another rank"
        else:
            self.reason = f"train.max_time={self.max_time_s:.0f}s nearly used"
        return self.reason

    @contextlib.contextmanager
    def measure_save(self) -> Iterator[None]:
        """Times a checkpoint save, for the budget."""
        start = self.clock()
        try:
            yield
        finally:
            self.note_save(self.clock() - start)


def measure_save(control: StopControl | None):
    """``control.measure_save()``, or nothing outside ``train()`` (a save called from a notebook)."""
    return control.measure_save() if control is not None else contextlib.nullcontext()


class RolloutInterrupted(Exception):
    """A stop request between two generation batches of a MiniLLM rollout; the message is the reason."""


def phase_start_state(sampler) -> tuple[dict, dict]:
    """What sampling a rollout changes besides its buffer: every RNG and the prompt cursor."""
    from ..checkpoint import rng_state

    return rng_state(), sampler.state_dict()


def restore_phase_start(sampler, state: tuple[dict, dict]) -> None:
    from ..checkpoint import set_rng_state

    set_rng_state(state[0])
    sampler.load_state_dict(state[1])
