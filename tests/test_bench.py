"""minillm-bench: the tiny preset runs on CPU and writes a JSON whose numbers are consistent with each other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from minillm.bench.parts import measure_ceilings
from minillm.cli.bench import DEVICES, PRESETS, SHAPES, main


def test_help_imports_nothing_heavy():
    """--help answers without importing torch (what keeps it fast; a wall-clock bound would be flaky on a busy box)."""
    out = subprocess.run([sys.executable, "-m", "minillm.cli.bench", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--preset" in out.stdout
    code = "import sys, minillm.cli.bench; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def issue17_summary(path) -> str:
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("issue17_summary", REPO / "scripts/issue17_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return "\n".join(module.rollout_lines("gpt2", json.loads(path.read_text()), 0.8, 12, 2.4))


def check_breakdown(breakdown: dict, prompt_width: int, score: bool, forwards: dict) -> None:
    """Issue 17 item 6: the breakdown's counts are the ones its coin string implies (test_rollout_breakdown's
    oracle); the CPU clock is perf_counter; on CPU nothing compiles."""
    from test_rollout_breakdown import expected_parts

    counts, tokens = expected_parts(breakdown["coins"], prompt_width, score)
    parts = breakdown["parts"]
    assert {k: v["count"] for k, v in parts.items()} == dict(counts)
    assert breakdown["student_steps"] == counts["student_step"] and breakdown["teacher_steps"] == counts["teacher_step"]
    assert breakdown["catch_ups"] == {"count": counts["student_catch_up"] + counts["teacher_catch_up"],
                                      "tokens": tokens["student_catch_up"] + tokens["teacher_catch_up"]}
    assert breakdown["prefills"] == counts["student_prefill"] + counts["teacher_prefill"]
    assert breakdown["host_syncs"] == len(breakdown["coins"]) + 2
    assert breakdown["clock"] == "perf_counter"
    assert breakdown["unaccounted_seconds"] == pytest.approx(
        breakdown["wall_seconds"] - sum(p["seconds"] for p in parts.values()))
    # the traced call repeats the timed calls (same seed): same forwards
    assert forwards["student_forwards"] == sum(v for k, v in counts.items() if k.startswith("student"))
    assert forwards["teacher_forwards"] == sum(v for k, v in counts.items() if k.startswith("teacher"))
    for when in ("warmup", "timed_runs", "traced_call"):
        assert breakdown["compile"][when] == {"compiles": 0, "captures": 0, "step_shapes": 0, "compile_seconds": 0.0}


def test_tiny_preset_writes_consistent_json(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--batch", "4", "--new-tokens", "8", "--train-batch", "2", "--chunk-size", "16",
                 "--alpha", "0.5", "--repeats", "2", "--extra-teacher", "b=tiny-teacher", "--extra-teacher",
                 "c=tiny-student", "--output", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    assert result["device"]["peak_bandwidth_Bps"] is None and "unknown" in result["device"]["note"]
    setup = result["setup"]
    assert (setup["batch"], setup["new_tokens"], setup["train_batch"], setup["alpha"]) == (4, 8, 2, 0.5)
    assert setup["student_params"] < setup["teacher_params"]
    phases = result["phases"]
    assert set(phases) == {"rollout", "teacher_scoring", "training_step", "single_step_kl", "teacher_reuse",
                           "phase_estimate", "teacher_scoring_per_teacher"}
    # multi-teacher routing: each --extra-teacher scores the same rollouts, timed like the main teacher
    per_teacher = phases["teacher_scoring_per_teacher"]
    assert list(per_teacher) == ["teacher", "b", "c"] and per_teacher["teacher"] == phases["teacher_scoring"]
    assert (per_teacher["b"]["params"], per_teacher["c"]["params"]) == (setup["teacher_params"],
                                                                        setup["student_params"])
    positions = setup["train_batch"] * (setup["prompt_len"] + setup["new_tokens"])
    for entry in per_teacher.values():
        for variant in ("plain", "chunked"):
            assert entry[variant]["tokens_per_s"] * entry[variant]["seconds"] == pytest.approx(positions)
    assert setup["repeats"] == 2
    rollout = phases["rollout"]
    naive, fast, hf = rollout["naive"], rollout["fast_eager"], rollout["hf_generate_student_only"]
    assert hf["teacher_forwards"] == 0 and hf["student_forwards"] == 8
    speedup_vs_hf = rollout["speedup_vs_hf_generate_student_only"]["fast_eager"]
    assert speedup_vs_hf == pytest.approx(hf["seconds"] / fast["seconds"])
    device = result["device"]  # the ceilings this run measured (a copy and a matmul), next to the datasheet's
    assert device["measured_bandwidth_Bps"] > 1e8 and device["measured_matmul_flops"] > 1e8
    elem = 4  # fp32
    for entry in (naive, fast, hf):
        assert entry["tokens_per_s"] * entry["seconds"] == pytest.approx(4 * 8)
        assert entry["fraction_of_bandwidth_limit"] is None  # CPU: no datasheet number, never invented
        weight_bytes = (entry["student_forwards"] * setup["student_params"]
                        + entry["teacher_forwards"] * setup["teacher_params"]) * elem
        assert entry["fraction_of_measured_bandwidth"] == pytest.approx(
            weight_bytes / device["measured_bandwidth_Bps"] / entry["seconds"])
    assert naive["teacher_forwards"] == 8 and naive["student_forwards"] == 8
    # the fast engine runs the teacher only on its coin's steps (+ nothing at the end: score=False)
    heads = round(fast["teacher_step_fraction"] * 8)
    assert fast["teacher_forwards"] == heads and fast["student_forwards"] <= 8 - heads + 1
    assert rollout["speedup_vs_naive"]["fast_eager"] == pytest.approx(naive["seconds"] / fast["seconds"])
    check_breakdown(fast["breakdown"], prompt_width=16, score=False, forwards=fast)
    summary = issue17_summary(path)  # what `gpu_check.sh bench17` prints from this JSON
    assert "variant fast_eager" in summary and f"{rollout['speedup_vs_naive']['fast_eager']:.3f}" in summary
    assert "host_sync" in summary and "compiles + captures in the timed calls" in summary
    alone = rollout["fast_student_only"]  # the engine at alpha = 0 (minillm-eval --engine fast): no teacher call
    assert alone["teacher_forwards"] == 0 and alone["student_forwards"] >= 1 and alone["cuda_graphs"] is False
    assert rollout["speedup_vs_hf_generate_student_only"]["fast_student_only"] == pytest.approx(
        rollout["hf_generate_student_only"]["seconds"] / alone["seconds"])
    assert "fast_student_only" not in rollout["speedup_vs_naive"]
    check_breakdown(alone["breakdown"], prompt_width=16, score=False, forwards=alone)
    assert alone["breakdown"]["coins"] == "0" * 8 and alone["breakdown"]["student_steps"] == 7  # prefill + 7 steps
    spec = rollout["speculative_eager"]  # default 4 drafts per round; the teacher verifies once per round
    assert spec["draft_tokens"] == 4 and spec["teacher_forwards"] == spec["rounds"] >= 2  # 8 tokens
    assert 0.0 <= spec["acceptance"] <= 1.0 and spec["tokens_per_s"] * spec["seconds"] == pytest.approx(4 * 8)
    assert rollout["speedup_vs_naive"]["speculative_eager"] == pytest.approx(naive["seconds"] / spec["seconds"])
    for name in ("teacher_scoring", "training_step", "single_step_kl"):
        extra = {"chunked_checkpointed"} if name == "single_step_kl" else set()
        assert set(phases[name]) == {"plain", "chunked"} | extra
        for entry in phases[name].values():
            assert entry["seconds"] > 0 and entry["tokens_per_s"] > 0
    positions = 2 * (16 + 8)  # train batch x (prompt + response) of the tiny preset
    for name, params, factor in (("teacher_scoring", "teacher_params", 2), ("training_step", "student_params", 6)):
        for entry in phases[name].values():
            assert entry["fraction_of_flop_limit"] is None
            assert entry["fraction_of_measured_matmul_flops"] == pytest.approx(
                factor * setup[params] * positions / device["measured_matmul_flops"] / entry["seconds"])
    reuse = phases["teacher_reuse"]
    assert reuse["cached_hidden_bytes_per_micro_batch_bf16"] == 2 * 8 * 128 * 2  # B × L × H_teacher × 2 bytes
    assert reuse["cached_logits_bytes_per_micro_batch_bf16"] == 2 * 8 * 512 * 2  # B × L × V × 2 bytes
    # the whole-phase estimate is composed exactly from the measured parts (4 rollouts = 2 micro-batches, 4 epochs)
    phase, scoring, training = phases["phase_estimate"], phases["teacher_scoring"], phases["training_step"]
    assert phase["naive_seconds"] == pytest.approx(
        naive["seconds"] + 2 * (scoring["plain"]["seconds"] + 4 * training["plain"]["seconds"]))
    teacher = reuse["teacher_forward_seconds_per_micro_batch"]
    assert phase["fast_rollout_variant"] in ("fast_eager", "speculative_eager")
    assert phase["fast_seconds"] == pytest.approx(
        rollout[phase["fast_rollout_variant"]]["seconds"] + 2 * (scoring["chunked"]["seconds"] + 4 * max(training["chunked"]["seconds"] - teacher, 0)))
    assert phase["speedup"] == pytest.approx(phase["naive_seconds"] / phase["fast_seconds"])
    assert result["finite"] is True


def test_tables_are_well_formed():
    for student, teacher, *sizes in PRESETS.values():
        assert student in SHAPES and teacher in SHAPES and all(s > 0 for s in sizes)
    for bandwidth, flops in DEVICES.values():
        assert 1e12 <= bandwidth <= 1e13 and 1e14 <= flops <= 1e16
    assert DEVICES["H100"] == (3.35e12, 989e12)


def test_bf16_run_times_the_rollout_without_the_sampling_copy(tmp_path):
    """In bf16 the bench also decodes with an fp32 copy of the student under autocast (the local strategy without
    strategy.sampling_copy), from the same coins: same forwards, and the ratio is reported, not a fast variant."""
    path = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--batch", "4", "--new-tokens", "8", "--train-batch", "2", "--chunk-size", "16",
                 "--alpha", "0.5", "--repeats", "1", "--dtype", "bf16", "--skip-naive", "--draft-tokens", "0",
                 "--output", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["dtype"] == "bfloat16"
    rollout = result["phases"]["rollout"]
    fast, fp32 = rollout["fast_eager"], rollout["fast_fp32_student_autocast"]
    assert (fp32["student_forwards"], fp32["teacher_forwards"]) == (fast["student_forwards"], fast["teacher_forwards"])
    assert fp32["sampling_copy_speedup"] == pytest.approx(fp32["seconds"] / fast["seconds"])
    assert "fast_fp32_student_autocast" not in rollout["speedup_vs_hf_generate_student_only"]
    assert "naive" not in rollout and "speedup_vs_naive" not in rollout


def test_measured_ceilings_are_consistent_with_their_own_timings(monkeypatch):
    """The ceilings are bytes (read + written) and 2·n³ FLOPs over the median of the timed calls."""
    import minillm.bench.parts as bench

    timings = iter([0.5, 0.25])  # the copy, then the matmul

    def fake_timed(device, fn, repeats=1):
        fn()  # the work still runs (on random data)
        return next(timings), None, None

    monkeypatch.setattr(bench, "_timed", fake_timed)
    ceilings = measure_ceilings(torch.device("cpu"), torch.float32)
    assert ceilings["measured_bandwidth_Bps"] == 2 * (64 << 20) / 0.5
    assert ceilings["measured_matmul_flops"] == 2 * 512 ** 3 / 0.25
    assert "64 MiB" in ceilings["measured_with"] and "512x512 float32" in ceilings["measured_with"]
