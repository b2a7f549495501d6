"""Cached, timed pipeline stages and subprocess running for the demo.

A stage is skipped when its record (``<out>/stages/<name>.json``) holds the same settings fingerprint and every
output it names exists. A stage's settings include the fingerprints of the stages it reads from, so a change
anywhere reruns everything downstream and nothing upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable settings (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes: lets settings follow the content of an input file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    seconds: float        # wall time of the run that produced the outputs (the cached one when skipped)
    cached: bool          # True: skipped in this invocation because its outputs were up to date
    fingerprint: str


class StageFailed(RuntimeError):
    pass


class Stages:
    """Runs stages in order, printing a numbered, timed line for each; remembers their results."""

    def __init__(self, out_dir: Path, total: int, force: bool = False, log: Callable[[str], None] = print):
        self.out_dir = out_dir
        self.total = total
        self.force = force
        self.log = log
        self.results: dict[str, StageResult] = {}

    def fp(self, name: str) -> str:
        return self.results[name].fingerprint

    def run(self, name: str, title: str, settings: dict[str, Any], outputs: Sequence[Path],
            fn: Callable[[], None], record: Path | None = None) -> StageResult:
        """Run ``fn`` unless an earlier run with the same ``settings`` left all ``outputs`` (then skip)."""
        index = len(self.results) + 1
        record = record or self.out_dir / "stages" / f"{name}.json"
        fp = fingerprint(settings)
        previous = _read_record(record)
        header = f"[demo] ({index}/{self.total}) {name}: {title}"
        if (not self.force and previous is not None and previous.get("fingerprint") == fp
                and all(Path(p).exists() for p in outputs)):
            result = StageResult(name, float(previous["seconds"]), True, fp)
            self.log(f"{header} ... cached (took {result.seconds:.1f} s when it ran)")
        else:
            self.log(f"{header}")
            if record.exists():
                record.unlink()  # a stale record must not survive a failed rerun
            start = time.perf_counter()
            fn()
            missing = [str(p) for p in outputs if not Path(p).exists()]
            if missing:
                raise StageFailed(f"stage {name} finished but did not write {', '.join(missing)}")
            result = StageResult(name, time.perf_counter() - start, False, fp)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"fingerprint": fp, "seconds": result.seconds, "settings": settings},
                                         indent=1, default=str) + "\n")
            self.log(f"[demo] ({index}/{self.total}) {name}: done in {result.seconds:.1f} s")
        self.results[name] = result
        return result


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_command(args: Sequence[str], log_file: Path, *, prefix: str = "    | ",
                echo: Callable[[str], bool] | None = None, env: dict[str, str] | None = None) -> None:
    """Run ``python -m ...`` style ``args``, streaming its output (prefixed) and saving it to ``log_file``.

    ``echo(line)`` decides which lines are shown (all by default); every line goes to the log file. On failure
    the last lines are shown and :class:`StageFailed` names the command and the log.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=30)
    merged_env = {**os.environ, **(env or {})}
    with log_file.open("w", encoding="utf-8") as log, subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=merged_env) as proc:
        log.write("$ " + " ".join(args) + "\n")
        assert proc.stdout is not None
        for raw in proc.stdout:
            # tqdm redraws with carriage returns: keep the last state of each line
            line = raw.rstrip("\n").split("\r")[-1]
            log.write(line + "\n")
            tail.append(line)
            if line.strip() and (echo is None or echo(line)):
                print(prefix + line, flush=True)
        code = proc.wait()
    if code != 0:
        shown = "\n".join(prefix + t for t in tail)
        raise StageFailed(f"command failed with exit code {code}: {' '.join(args)}\n{shown}\n(full log: {log_file})")


class ProgressFilter:
    """Shows a subprocess's lines but thins out progress bars: at most one tqdm update per ``every`` seconds
    (and always the last, 100 % one), and none of transformers' weight-loading/saving bars."""

    NOISE = ("Loading weights", "Writing model shards", "Converting and de-quantizing")

    def __init__(self, every: float = 15.0):
        self.every = every
        self.last = float("-inf")

    def __call__(self, line: str) -> bool:
        if any(n in line for n in self.NOISE):
            return False
        if "|" in line and "%|" in line:  # a tqdm bar
            now = time.monotonic()
            if "100%|" in line or now - self.last >= self.every:
                self.last = now
                return True
            return False
        return True


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]
