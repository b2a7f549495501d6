"""What compiling and capturing the engine's decode steps cost, counted for the trainer's metrics and the benchmark.

Three counts, all process-wide and only ever growing:

* ``compiles``: dynamo compilations (one per graph dynamo builds: a new shape, a guard failure, a recompile to
  dynamic shapes), from dynamo's compile callback (``torch._dynamo.callback.callback_handler``, trigger DYNAMO);
* ``captures``: CUDA graph recordings by inductor's CUDA-graph trees (trigger CUDAGRAPH_RECORDING; 0 on CPU);
* ``step_shapes``: distinct (model, batch, cache length) shapes the engine ran a compiled decode step for (each one
  is a graph capture on CUDA). Bucketing (:mod:`minillm.generation.engine`) exists to keep this number flat.

``seconds`` is the wall time of the compiled decode calls during which a compile or capture happened: the compile
itself, CUDA-graph warm-up and recording (dynamo's callback only brackets the bookkeeping of a recording, so the
call is timed instead). Calls that compile nothing are not charged, and nothing here synchronises the device.

The callback is installed on first use, not at import: importing the library changes nothing in dynamo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["CompileStats", "CompileLog", "STATS", "install"]


@dataclass
class CompileStats:
    compiles: int = 0
    captures: int = 0
    step_shapes: int = 0
    seconds: float = 0.0

    def events(self) -> int:
        """Compiles plus captures: a change between two reads means something was compiled or captured."""
        return self.compiles + self.captures

    def copy(self) -> "CompileStats":
        return CompileStats(self.compiles, self.captures, self.step_shapes, self.seconds)

    def minus(self, earlier: "CompileStats") -> "CompileStats":
        return CompileStats(self.compiles - earlier.compiles, self.captures - earlier.captures,
                            self.step_shapes - earlier.step_shapes, self.seconds - earlier.seconds)

    def as_dict(self) -> dict:
        return {"compiles": self.compiles, "captures": self.captures, "step_shapes": self.step_shapes,
                "compile_seconds": self.seconds}


STATS = CompileStats()


def _on_start(args) -> None:
    # by name, never raising: an exception here would fail the compile it observes (torch versions differ in
    # which triggers exist)
    trigger = getattr(getattr(args, "callback_trigger", None), "name", "")
    if trigger == "DYNAMO":
        STATS.compiles += 1
    elif trigger == "CUDAGRAPH_RECORDING":
        STATS.captures += 1


def install() -> None:
    """Register the dynamo callback unless it is registered already. Checked on every call, not remembered:
    ``torch._dynamo.reset()`` clears dynamo's callbacks, and a user (or a test) may call it between two runs.
    Older torch without the callback module: compiles and captures stay 0 (the engine's own ``step_shapes`` count
    and the timed seconds still work)."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return
    if _on_start not in getattr(callback_handler, "start_callbacks", ()):
        callback_handler.register_start_callback(_on_start)


def new_step_shape() -> None:
    STATS.step_shapes += 1


def start() -> tuple[int, float]:
    """Before a compiled call: the event count and the clock."""
    return STATS.events(), time.perf_counter()


def charge(mark: tuple[int, float]) -> None:
    """After a compiled call: its wall time counts as compile time if it compiled or captured anything."""
    events, began = mark
    if STATS.events() != events:
        STATS.seconds += time.perf_counter() - began


class CompileLog:
    """The trainer's view: counts since it was created and the seconds spent compiling since its last ``pop``
    (``time/compile`` of one logging interval; the counts are cumulative so a flat line means no recompiles)."""

    def __init__(self):
        install()
        self.base = STATS.copy()
        self.last_seconds = STATS.seconds

    def pop(self) -> dict[str, float]:
        since = STATS.minus(self.base)
        seconds, self.last_seconds = STATS.seconds - self.last_seconds, STATS.seconds
        return {"time/compile": seconds, "engine/compiles": since.compiles, "engine/captures": since.captures,
                "engine/step_shapes": since.step_shapes}
