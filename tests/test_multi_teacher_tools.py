"""Issue 21 item 4: minillm-compare knows the OPD recipes; minillm-bench times each teacher's scoring of the same
rollouts (multi-teacher routing), and a routed MiniLLM phase logs time/score/<teacher>."""

from __future__ import annotations

import pytest

from minillm.cli.bench import main as bench_main
from minillm.compare import CompareError, resolve_method
from minillm.config import shipped_config_dir


def test_compare_resolves_opd_recipes():
    root = shipped_config_dir()
    assert resolve_method("opd", "tiny").config == root / "tiny" / "opd.yaml"
    spec = resolve_method("opd", "qwen3-1.7b-from-qwen3-8b")
    assert spec.config == root / "opd" / "qwen3-1.7b-from-qwen3-8b.yaml" and spec.overrides == []
    with pytest.raises(CompareError, match="no recipe"):
        resolve_method("opd", "no-such-pair")


def test_bench_rejects_a_malformed_extra_teacher_before_measuring():
    for value in ("tiny-teacher", "teacher=tiny-teacher"):
        with pytest.raises(ValueError, match="NAME=SHAPE"):
            bench_main(["--preset", "tiny", "--extra-teacher", value])
