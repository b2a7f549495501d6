"""Thin command-line entry points over the importable library.

The console scripts (``minillm-train``, ...) and ``python -m minillm.cli.X`` run each module's ``main`` through
:func:`run_console`: a failure prints its traceback and ends the process at once with a non-zero status, even when
background work (torch.compile's workers on CUDA) would keep the interpreter alive (:mod:`minillm.runtime`).
``main(argv)`` itself stays an ordinary function that raises, for notebooks and tests.
"""

import importlib
import sys


def command_name(main) -> str:
    """``minillm.cli.teacher_cache`` → ``minillm-teacher-cache`` (also under ``python -m``, where the module is
    ``__main__`` and its spec keeps the real name)."""
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else main.__module__
    return "minillm-" + name.rsplit(".", 1)[-1].replace("_", "-")


def is_user_error(error: BaseException) -> bool:
    """A mistake in what the user gave (minillm.errors.UserError: config, data, settings...) or a problem with a
    path, a permission or the disk (OSError): reported as one line. Anything else is a bug and keeps its traceback."""
    from ..errors import UserError

    return isinstance(error, (UserError, OSError))


def report_user_error(command: str, error: BaseException) -> int:
    """For a ``main`` that catches its expected errors itself (and returns a status, for tests and notebooks):
    print ``<command>: error: <message>`` on one line and return 2, as run_console does; with ``MINILLM_DEBUG=1``
    re-raise instead, so the traceback shows."""
    import os

    if os.environ.get("MINILLM_DEBUG", "") not in ("", "0"):
        raise error
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{command}: error: {message}", file=sys.stderr)
    return 2


def run_console(main) -> None:
    """``sys.exit(main())`` for a console script: a user error prints ``minillm-<cmd>: error: ...`` and exits 2
    (``MINILLM_DEBUG=1``: with its traceback); any failure ends the process promptly (minillm.runtime.run_main)."""
    import os

    from ..runtime import run_main

    def guarded():
        try:
            return main()
        except Exception as error:  # noqa: BLE001 — classified here, re-raised unless it is the user's
            if not is_user_error(error) or os.environ.get("MINILLM_DEBUG", "") not in ("", "0"):
                raise
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"{command_name(main)}: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    sys.exit(run_main(guarded))


def _entry(module: str):
    def entry() -> None:
        run_console(importlib.import_module(f"minillm.cli.{module}").main)

    entry.__name__ = f"{module}_command"
    entry.__doc__ = f"Console entry point of minillm.cli.{module}."
    return entry


# the [project.scripts] targets, minillm-train = "minillm.cli:train_command" and so on (not named after the
# submodules, which would replace them as attributes of this package once imported)
(train_command, eval_command, generate_command, data_command, compare_command, bench_command,
 teacher_cache_command, check_command, teacher_serve_command) = (
    _entry(m) for m in ("train", "eval", "generate", "data", "compare", "bench", "teacher_cache", "check",
                        "teacher_serve"))


def finish_process(code: int) -> int:
    """Return ``code``, or, in a finished multi-process run, exit with it at once without native teardown.

    By the time a CLI calls this, results, checkpoints and metrics are written and the process group is
    destroyed. Yet about one 2-process gloo run in 50 still aborted in C++ static destructors afterwards
    ("terminate called without an active exception": rc != 0 for a run that finished; env-notes §2c saw 2 in 6
    before the explicit destroy_process_group). ``os._exit`` after flushing skips those destructors. Only the
    CLIs call this, never the importable ``run`` functions, so a notebook keeps its kernel.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
