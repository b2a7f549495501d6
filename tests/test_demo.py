"""The embedded demo (scripts/demo.sh, python -m minillm.demo) on the committed tiny assets, and its helpers.

The end-to-end test runs the whole pipeline (minillm-generate → SFT → MiniLLM → minillm-eval → report) on the
`tiny` profile in a subprocess, then checks every number of summary.json against an independent recomputation
from the evaluation's sample files, the report's table and samples, the PNG files, and that a second run is
served from the cache.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.demo.models import evenly_spaced_layers, outer_layers, prune_layers
from minillm.demo.prompts import Prompt, load_own_prompts, split_prompts
from minillm.demo.stages import fingerprint

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
STAGES = ["teacher", "student-init", "prompts", "teacher-data", "sft", "minillm", "eval"]
MODELS = ["teacher", "sft", "minillm"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "minillm.demo", "--assets", "tiny", "--out", str(out), "--device", "cpu"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "tiny"
    first = _run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, first, summary


def test_summary_has_every_model_metric_and_stage_time(tiny_demo):
    _, _, summary = tiny_demo
    assert summary["profile"] == "tiny" and summary["device"] == "cpu"
    assert list(summary["models"]) == MODELS
    for name, m in summary["models"].items():
        for key in ("rougeL", "teacher_logprob", "reverse_kl_k3", "dist4"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key, m[key])
        assert 0.0 <= m["rougeL"] <= 100.0 and 0.0 <= m["dist4"] <= 100.0
        assert m["teacher_logprob"] < 0.0  # a log-probability of sampled tokens
    # The teacher scored by itself: k3 of p against p is exactly 0 per token.
    assert summary["models"]["teacher"]["reverse_kl_k3"] == pytest.approx(0.0, abs=1e-5)
    # Students are pruned from the tiny teacher (2 -> 1 layer): fewer parameters, same vocabulary.
    params = {n: summary["models"][n]["parameters"] for n in MODELS}
    assert params["sft"] == params["minillm"] < params["teacher"] == 139_584
    assert list(summary["stages"]) == STAGES
    for st in summary["stages"].values():
        assert st["cached"] is False and st["seconds"] >= 0.0 and math.isfinite(st["seconds"])
    assert summary["stages"]["sft"]["seconds"] > 0.5 and summary["stages"]["eval"]["seconds"] > 0.5
    assert summary["total_seconds"] >= sum(st["seconds"] for st in summary["stages"].values())
    v = summary["verdict"]
    gain = summary["models"]["minillm"]["teacher_logprob"] - summary["models"]["sft"]["teacher_logprob"]
    assert v["teacher_logprob_gain"] == pytest.approx(gain)
    assert v["minillm_closer_to_teacher"] is (gain > 0)


def test_summary_numbers_match_the_evaluation_samples(tiny_demo):
    """Rouge-L and Dist-4 recomputed from minillm-eval's per-seed sample files equal the summary's numbers."""
    from minillm.evaluation import distinct_n, rouge_l

    out, _, summary = tiny_demo
    references = [json.loads(line) for line in (out / "data" / "teacher_heldout.jsonl").read_text().splitlines()]
    assert len(references) == summary["settings"]["num_heldout"] == 16
    ref_by_prompt = {r["prompt"]: r["output"] for r in references}
    (set_dir,) = [d for d in (out / "eval" / "teacher").iterdir() if d.is_dir()]
    for name in MODELS:
        samples = json.loads((out / "eval" / name / set_dir.name / "seed20.json").read_text())["samples"]
        assert len(samples) == 16
        outputs = [s["output"] for s in samples]
        refs = [ref_by_prompt[s["prompt"]] for s in samples]
        assert summary["models"][name]["rougeL"] == pytest.approx(rouge_l(outputs, refs), abs=1e-6)
        assert summary["models"][name]["dist4"] == pytest.approx(distinct_n(outputs, 4), abs=1e-6)


def test_data_split_is_disjoint_and_training_runs_used_it(tiny_demo):
    out, _, summary = tiny_demo
    s = summary["settings"]
    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / "data" / name).read_text().splitlines()]

    train, dev, heldout = read("teacher_train.jsonl"), read("teacher_dev.jsonl"), read("teacher_heldout.jsonl")
    assert (len(train), len(dev), len(heldout)) == (s["num_train"], s["num_dev"], s["num_heldout"])
    prompts = [r["prompt"] for r in train + dev + heldout]
    assert all(p.startswith("Below is an instruction") for p in prompts)  # profile template: reference
    heldout_ids = {r["id"] for r in read("heldout_prompts.jsonl")}
    train_ids = {r["id"] for r in read("train_prompts.jsonl")}
    assert not heldout_ids & train_ids
    for run in ("sft", "minillm"):
        metrics = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert any("train/loss" in m for m in metrics)
        assert (out / run / "final" / "model.safetensors").is_file()
    minillm_keys = set().union(*[json.loads(line) for line in (out / "minillm" / "metrics.jsonl").read_text()
                                 .splitlines()])
    assert {"rollout/reward", "rollout/reverse_kl_k3", "train/pg_loss", "dev/reverse_kl_k3"} <= minillm_keys


def test_report_has_table_samples_and_valid_pngs(tiny_demo):
    out, _, summary = tiny_demo
    report = (out / "report.md").read_text()
    assert "| model | parameters | Rouge-L vs teacher" in report
    for label, name in (("| Teacher |", "teacher"), ("| SFT student |", "sft"), ("| MiniLLM student |", "minillm")):
        row = next(line for line in report.splitlines() if line.startswith(label))
        assert f"{summary['models'][name]['teacher_logprob']:.3f}" in row
        assert f"{summary['models'][name]['rougeL']:.2f}" in row
    assert summary["verdict"]["text"] in report
    assert "| teacher (reference) | SFT student | MiniLLM student |" in report
    first_heldout = json.loads((out / "data" / "heldout_prompts.jsonl").read_text().splitlines()[0])
    assert first_heldout["id"] in report
    assert set(summary["plots"]) >= {"minillm_reward.png", "minillm_reverse_kl.png", "minillm_losses.png",
                                     "sft_loss.png"}
    for name in summary["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 300 and height >= 200 and len(data) > 5_000
        assert f"![{name}]({name})" in report


def test_second_run_reuses_every_stage(tiny_demo):
    out, _, first = tiny_demo
    again = _run_demo(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("... cached") == len(STAGES)
    second = json.loads((out / "summary.json").read_text())
    for name in STAGES:
        assert second["stages"][name]["cached"] is True
        assert second["stages"][name]["seconds"] == first["stages"][name]["seconds"]
    assert second["models"] == first["models"]


# ------------------------------------------------------------------------------------------------ helpers
def test_layer_choices():
    assert outer_layers(30, 6) == [0, 1, 2, 27, 28, 29]
    assert outer_layers(30, 5) == [0, 1, 2, 28, 29]
    assert outer_layers(2, 1) == [0] and outer_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(30, 30) == list(range(30))
    assert evenly_spaced_layers(2, 1) == [0]
    assert evenly_spaced_layers(5, 2) == [0, 4]
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        evenly_spaced_layers(6, 7)


def test_pruned_student_keeps_teacher_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert prune_layers(ASSETS / "teacher", tmp_path / "all", 2, "even") == [0, 1]
    assert prune_layers(ASSETS / "teacher", tmp_path / "one", 1, "outer") == [0]
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "all")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(full(ids).logits, teacher(ids).logits)  # keeping every layer is the teacher itself
    assert one.config.num_hidden_layers == 1
    t_state, s_state = teacher.state_dict(), one.state_dict()
    assert set(s_state) == {k for k in t_state if ".layers.1." not in k}
    assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert AutoTokenizer.from_pretrained(tmp_path / "one").get_vocab() == \
        AutoTokenizer.from_pretrained(ASSETS / "teacher").get_vocab()


def test_split_prompts_is_deterministic_disjoint_and_stratified():
    big = [Prompt(f"a{i}", f"question {i}") for i in range(90)]
    small = [Prompt(f"b{i}", f"other {i}") for i in range(10)]
    train, heldout = split_prompts([big, small], 60, 20, seed=3)
    assert len(train) == 60 and len(heldout) == 20
    assert not {p.id for p in train} & {p.id for p in heldout}
    assert sum(p.id.startswith("b") for p in heldout) == 2  # 10 % of the held-out set, like its share
    # the order of the input lists does not change the split
    assert split_prompts([big[::-1], small[::-1]], 60, 20, seed=3) == (train, heldout)
    assert split_prompts([big, small], 60, 20, seed=4) != (train, heldout)
    assert len(split_prompts([big, small], -1, 20)[0]) == 80
    with pytest.raises(ValueError, match="only 80 are left"):
        split_prompts([big, small], 81, 20)


def test_own_prompts_are_short_unique_instructions():
    prompts = load_own_prompts()
    assert len(prompts) >= 30
    assert len({p.instruction for p in prompts}) == len(prompts) and len({p.id for p in prompts}) == len(prompts)
    assert all(5 <= len(p.instruction) <= 120 for p in prompts)


def test_fingerprint_ignores_key_order():
    assert fingerprint({"a": 1, "b": {"c": [1, 2]}}) == fingerprint({"b": {"c": [1, 2]}, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
