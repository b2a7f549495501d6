"""Process-level safety for entry points: a failed run exits with its error, promptly.

A CUDA run starts things a CPU run does not: torch.compile's inductor keeps a pool of compile workers (a
``SubprocPool`` sidecar process with ``torch._inductor.config.compile_threads`` workers, warmed at import when Triton
is installed, plus a ``ThreadPoolExecutor``). At interpreter exit Python first joins every non-daemon thread and
every executor's pending work (``concurrent.futures`` registers that), then runs the atexit handlers, among them
inductor's ``shutdown_compile_workers``, which waits up to 300 s for the sidecar to stop its workers. A run that
raised while compiles (or any other background work) were still in flight thus printed its traceback and stayed
alive. :func:`run_main` reports the error, asks the compile workers to stop (bounded wait), flushes the logs and ends
the process with ``os._exit``, which waits for nothing. Orphaned compile workers kill themselves (inductor's worker
watchdog checks its parent every 60 s); the sidecar is killed here.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from typing import Callable, TypeVar

__all__ = ["run_main", "exit_now"]

T = TypeVar("T")

# Seconds granted to inductor's compile-worker shutdown before the process ends anyway.
SHUTDOWN_GRACE_S = 3.0


def _stop_compile_workers(grace_s: float) -> None:
    """Ask inductor's compile-worker pools to stop, waiting at most ``grace_s``; kill the sidecar processes left."""
    inductor = sys.modules.get("torch._inductor.async_compile")
    if inductor is None:  # never imported: nothing was started
        return
    pools = list(getattr(inductor, "_pool_set", ()))
    stopper = threading.Thread(target=getattr(inductor, "shutdown_compile_workers", lambda: None), daemon=True)
    stopper.start()
    stopper.join(grace_s)
    for pool in pools:
        process = getattr(pool, "process", None)  # SubprocPool's sidecar (a subprocess.Popen)
        if process is not None and process.poll() is None:
            process.kill()


def exit_now(code: int, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """End the process with ``code`` now: stop compile workers (bounded), flush logs and streams, ``os._exit``.
    Skips the joins of non-daemon threads and executors and the atexit handlers, any of which can block."""
    try:
        _stop_compile_workers(grace_s)
    except Exception:  # a failure while ending must not hide the run's own error, nor keep the process alive
        traceback.print_exc()
    logging.shutdown()  # flushes and closes every handler (train.log)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def run_main(main: Callable[..., T], *args, **kwargs) -> T:
    """Call ``main(*args, **kwargs)``; if it raises, print the traceback to stderr and end the process at once with
    exit status 1 (130 on Ctrl-C, the given status for ``SystemExit``). A normal return, and ``SystemExit(0)``,
    go through the ordinary interpreter exit.

    For a console entry point: ``def main(argv=None): return run_main(_main, argv)``.
    """
    try:
        return main(*args, **kwargs)
    except SystemExit as stop:
        if stop.code in (None, 0):
            raise
        if not isinstance(stop.code, int):  # sys.exit("message"): Python prints it and exits 1
            print(stop.code, file=sys.stderr)
        exit_now(stop.code if isinstance(stop.code, int) else 1)
    except KeyboardInterrupt:
        traceback.print_exc()
        exit_now(130)
    except BaseException:
        traceback.print_exc()
        exit_now(1)
    raise AssertionError("unreachable")  # exit_now does not return
