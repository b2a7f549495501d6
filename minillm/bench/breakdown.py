"""Where a fast rollout's time goes (issue 17 item 6): one traced call of the engine after the timed ones, and the
compiles/captures of the warm-up and of the timed calls, so a miss of a target can be explained from the JSON.

Fields of ``rollout[variant]["breakdown"]``:

* ``parts``: {kind: {count, tokens, seconds}} from :class:`minillm.generation.trace.RolloutTrace` (student/teacher
  prefill, one-token steps, multi-token catch-ups, sampling, host syncs); ``clock`` says how they were timed;
* ``student_steps``, ``teacher_steps``: one-token forwards of each model; ``catch_ups``: {count, tokens} of the
  multi-token forwards over the other model's tokens (both models); ``prefills``; ``host_syncs``;
* ``coins``: the call's per-step coins as a string ("1" = the teacher drew that token), from which every count
  above follows;
* ``wall_seconds`` of the traced call and ``unaccounted_seconds`` (wall minus the parts: Python between spans,
  and on CUDA the host running behind the device);
* ``compile``: dynamo compiles, CUDA-graph captures, new step shapes and their seconds in the ``warmup`` call and
  summed over the ``timed_runs`` (anything but 0 there means recompiles or recaptures on every call) and in the
  ``traced_call``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..generation import compile_stats
from ..generation.trace import RolloutTrace

__all__ = ["CompileCounter", "traced_rollout", "format_breakdown"]


class CompileCounter:
    """Wraps a rollout function; records the compile/capture counts of each of its calls."""

    def __init__(self, fn: Callable[[], Any]):
        compile_stats.install()
        self.fn, self.calls = fn, []

    def __call__(self):
        before = compile_stats.STATS.copy()
        out = self.fn()
        self.calls.append(compile_stats.STATS.minus(before))
        return out

    def summary(self) -> dict:
        warmup = self.calls[0] if self.calls else compile_stats.CompileStats()
        timed = compile_stats.CompileStats()
        for call in self.calls[1:]:
            timed = compile_stats.CompileStats(timed.compiles + call.compiles, timed.captures + call.captures,
                                               timed.step_shapes + call.step_shapes, timed.seconds + call.seconds)
        return {"warmup": warmup.as_dict(), "timed_runs": timed.as_dict()}


def traced_rollout(device: torch.device, run: Callable[[RolloutTrace], Any], counter: CompileCounter) -> dict:
    """Call ``run(trace)`` once (after the timed calls) and return its breakdown (fields: module doc)."""
    trace = RolloutTrace(device)
    before = compile_stats.STATS.copy()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run(trace)
    parts = trace.summary()  # synchronises on CUDA
    wall = time.perf_counter() - start

    def part(kind: str, field: str) -> float:
        return parts.get(kind, {}).get(field, 0)

    catch_kinds = ("student_catch_up", "teacher_catch_up")
    compile_info = counter.summary()
    compile_info["traced_call"] = compile_stats.STATS.minus(before).as_dict()
    return {
        "clock": trace.clock, "wall_seconds": wall, "parts": parts,
        "unaccounted_seconds": wall - sum(p["seconds"] for p in parts.values()),
        "student_steps": part("student_step", "count"), "teacher_steps": part("teacher_step", "count"),
        "catch_ups": {"count": sum(part(k, "count") for k in catch_kinds),
                      "tokens": sum(part(k, "tokens") for k in catch_kinds)},
        "prefills": part("student_prefill", "count") + part("teacher_prefill", "count"),
        "host_syncs": part("host_sync", "count"),
        "coins": "".join("1" if c else "0" for c in out.teacher_steps.tolist()),
        "compile": compile_info,
    }


def format_breakdown(name: str, breakdown: dict) -> str:
    """A few lines for the terminal: seconds, count and tokens per part, then the compile counts."""
    lines = [f"{name}: {breakdown['wall_seconds']:.4f} s traced ({breakdown['clock']}), "
             f"{breakdown['unaccounted_seconds']:.4f} s outside the spans"]
    for kind, p in sorted(breakdown["parts"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"  {kind:<18} {p['seconds']:9.4f} s  {p['count']:6d} calls  {p['tokens']:7d} tokens")
    c = breakdown["compile"]
    lines.append("  compiles/captures/new shapes/seconds: warm-up {compiles}/{captures}/{step_shapes}/"
                 "{compile_seconds:.1f}".format(**c["warmup"])
                 + "; timed runs {compiles}/{captures}/{step_shapes}".format(**c["timed_runs"])
                 + "; traced call {compiles}/{captures}/{step_shapes}".format(**c["traced_call"]))
    return "\n".join(lines)
