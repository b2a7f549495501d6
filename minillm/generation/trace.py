"""Where a rollout's time goes: spans of the fast engine's loop, timed without a host sync in the loop.

On CUDA a span records two ``torch.cuda.Event`` s (asynchronous: the GPU stamps them when it gets there) and the
device is synchronised once, in :meth:`RolloutTrace.summary`, to read them; elsewhere ``time.perf_counter``. So on
CUDA a span's seconds are the GPU time between its two points, which is what a decode step costs when the host runs
ahead, and includes the GPU waiting for the host when it does not (a host-bound loop shows as steps far slower than
their kernels). Host syncs are timed on the host clock: how long the host waited.

:data:`NULL_TRACE` is the default: its spans do nothing, so an untraced rollout pays one attribute call per span.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

__all__ = ["RolloutTrace", "NULL_TRACE"]

_NOTHING = contextlib.nullcontext()


class _NullTrace:
    def span(self, kind: str, tokens: int = 0, host: bool = False):
        return _NOTHING


NULL_TRACE = _NullTrace()


class _Span:
    __slots__ = ("trace", "kind", "tokens", "host", "begin")

    def __init__(self, trace: "RolloutTrace", kind: str, tokens: int, host: bool):
        self.trace, self.kind, self.tokens, self.host = trace, kind, tokens, host

    def __enter__(self):
        self.begin = self.trace._now(self.host)
        return self

    def __exit__(self, *exc):
        self.trace._spans[self.kind].append((self.begin, self.trace._now(self.host), self.tokens, self.host))
        return False


class RolloutTrace:
    """Spans by kind. Kinds the engine records (``role`` is ``student`` or ``teacher``): ``{role}_prefill`` (the
    first forward of a model: prompt and any response tokens it has not seen), ``{role}_step`` (a one-token
    forward), ``{role}_catch_up`` (a forward over several response tokens the other model drew), ``sample``
    (warping, drawing and bookkeeping of one token) and ``host_sync`` (the coins' copy to the host, stop checks,
    the final column count)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: dict[str, list] = defaultdict(list)

    def span(self, kind: str, tokens: int = 0, host: bool = False) -> _Span:
        return _Span(self, kind, tokens, host)

    def _now(self, host: bool):
        if self.cuda and not host:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def summary(self) -> dict[str, dict]:
        """{kind: {"count", "tokens", "seconds"}} (one device sync on CUDA, here, to read the events)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        result = {}
        for kind, spans in sorted(self._spans.items()):
            seconds = sum((end - begin) if isinstance(begin, float) else begin.elapsed_time(end) / 1000.0
                          for begin, end, _, _ in spans)
            result[kind] = {"count": len(spans), "tokens": sum(s[2] for s in spans), "seconds": seconds}
        return result

    @property
    def clock(self) -> str:
        return "cuda_events (host syncs: perf_counter)" if self.cuda else "perf_counter"
