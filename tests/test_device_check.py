"""`minillm-check --device` on the CPU: every CPU path passes, CUDA-only paths are listed as skipped, and a broken
path (planted here) is reported as failed with a non-zero exit, a failed speed-up as "fell back"."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from minillm import device_check
from minillm.cli.check import main

CPU = torch.device("cpu")


def test_device_check_passes_on_cpu_and_lists_what_it_skipped(tmp_path, capsys):
    code = main(["--device", "--device-type", "cpu", "--scratch", str(tmp_path), "--json", str(tmp_path / "r.json")])
    rows = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    out = capsys.readouterr().out
    assert code == 0, out
    skipped = {name for name, r in rows.items() if r["status"] == "skipped"}
    assert skipped == {"decode: compiled steps (CUDA graphs)", "2 ranks, DeepSpeed ZeRO-3, sampling"}, out
    assert all(r["status"] == "ok" for name, r in rows.items() if name not in skipped), out
    assert "CUDA only" in rows["decode: compiled steps (CUDA graphs)"]["detail"]
    assert "final weights max |Δ| = 0.0e+00" in rows["checkpoint save + exact resume"]["detail"]
    assert "0 failed" in out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return device_check.build_workspace(tmp_path_factory.mktemp("assets"))


def test_stale_sampling_copy_is_caught(workspace, monkeypatch):
    """A refresh that copies nothing (replays of stale weights) must fail the sampling-copy check."""
    from minillm.strategy import HalfPrecisionCopy

    real = HalfPrecisionCopy.refresh
    calls = []

    def stale(self):
        calls.append(1)
        return real(self) if len(calls) == 1 else self.module  # the first fill, then never again

    monkeypatch.setattr(HalfPrecisionCopy, "refresh", stale)
    result = device_check._run_one("copy", lambda: device_check._check_sampling_copy(workspace, CPU))
    assert result.status == "failed" and "re-score" in result.detail, result


def test_wrong_decoder_log_probs_are_caught(workspace, monkeypatch):
    """A decoder whose reported log-probs do not match its tokens (what a stale cache produces) fails the check."""
    from minillm.generation import engine

    real = engine._LazyLM.finish

    def shifted(self, response, length):
        return real(self, response, length) + 0.01

    monkeypatch.setattr(engine._LazyLM, "finish", shifted)
    result = device_check._run_one("decode", device_check._check_decode(workspace, CPU, static=False, graphs=False))
    assert result.status == "failed" and "re-score" in result.detail, result


def test_a_logged_fallback_is_reported_as_fell_back():
    def check():
        logging.getLogger("minillm.generation.engine").warning("rollout.cuda_graphs: compiling failed (boom); falling back "
                                                    "to eager decoding")
        return "decoded"

    result = device_check._run_one("compiled", check)
    assert result.status == "fell back" and "rollout.cuda_graphs" in result.detail


def test_the_engines_own_fallback_warning_is_reported_as_fell_back(workspace, monkeypatch):
    """A static cache that cannot be built: the engine decodes on a dynamic cache with its one warning, and the check
    reports the path as "fell back" with that warning, not "ok"."""
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("planted: no static cache here")

    monkeypatch.setattr(transformers, "StaticCache", broken)
    result = device_check._run_one("static", device_check._check_decode(workspace, CPU, static=True, graphs=False))
    assert result.status == "fell back" and "rollout.static_cache" in result.detail, result


def test_failures_exit_non_zero(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(device_check, "_check_chunked_losses", broken)
    monkeypatch.setattr(device_check, "_check_minillm_run", lambda *a: "skipped in this test")
    monkeypatch.setattr(device_check, "_check_resume", lambda *a: "skipped in this test")
    assert main(["--device", "--device-type", "cpu", "--scratch", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError: planted" in out and "2 failed" in out


def test_console_entry_points_go_through_run_console():
    """Every [project.scripts] target is a minillm.cli *_command that runs the module's main via run_console
    (a failed run ends promptly with its error: minillm.runtime.run_main)."""
    import importlib
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 8
    for command, target in scripts.items():
        module, attr = target.split(":")
        assert module == "minillm.cli" and attr.endswith("_command"), (command, target)
        entry = getattr(importlib.import_module(module), attr)
        assert callable(entry) and entry.__doc__.endswith(f"minillm.cli.{attr[:-len('_command')]}.")
        importlib.import_module(f"minillm.cli.{attr[:-len('_command')]}").main  # noqa: B018 — the module exists


def test_a_failing_cli_exits_with_its_error(tmp_path):
    """A user error is one line `minillm-train: error: ...` with exit status 2 and no traceback; MINILLM_DEBUG=1
    shows the traceback; a bug (here a planted one) keeps its traceback and exits 1."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"broken\n')
    cmd = [sys.executable, "-m", "minillm.cli.train", "--no-preflight", "--config", "configs/tiny/kd.yaml",
           f"output_dir={tmp_path / 'out'}", f"data.train={bad}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == [f"minillm-train: error: {bad}:2: malformed JSON (Unterminated string starting at at column 2)"]
    assert "Traceback" not in proc.stderr
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, MINILLM_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    bug = subprocess.run([sys.executable, "-c", "import minillm.cli as c\n"
                          "def main():\n    raise KeyError('planted')\n"
                          "main.__module__ = 'minillm.cli.train'\nc.run_console(main)"],
                         capture_output=True, text=True, timeout=60)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'planted'" in bug.stderr
