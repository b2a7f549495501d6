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
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.demo.models import (block_influence, evenly_spaced_layers, influence_layers, outer_layers,
                                 prune_layers)
from minillm.demo.prompts import Prompt, load_own_prompts, split_prompts
from minillm.demo.stages import fingerprint
from minillm.demo.verdict import judge_greedy, repeated_trigram_fraction, verdict_text

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
STAGES = ["teacher", "prompts", "teacher-data", "student-init", "sft", "minillm", "eval", "greedy"]
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
    assert "| model | greedy answer | T = 1 sample (scored) |" in report
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


def _independent_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int, max_prompt_length: int,
                        penalty: float = 1.0) -> list[str]:
    """One prompt at a time, no padding, no KV cache, no generate(): argmax of the full forward until EOS, after
    CTRL's penalty θ on the logits of tokens already in the prompt or the answer (positive / θ, negative × θ)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny forwards: on a loaded machine 2 threads are ~20x slower than 1
    try:
        texts = [_greedy_one(model, tokenizer, prompt, max_new_tokens, max_prompt_length, penalty) for prompt in prompts]
    finally:
        torch.set_num_threads(threads)
    return texts


def _greedy_one(model, tokenizer, prompt: str, max_new_tokens: int, max_prompt_length: int, penalty: float) -> str:
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_prompt_length]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1].tolist()
            for seen in set(ids + new):
                logits[seen] = logits[seen] / penalty if logits[seen] > 0 else logits[seen] * penalty
            token = max(range(len(logits)), key=logits.__getitem__)
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_greedy_answers_equal_an_independent_greedy_decode(tiny_demo):
    out, _, summary = tiny_demo
    greedy = json.loads((out / "greedy" / "answers.json").read_text())
    heldout = [json.loads(line) for line in (out / "data" / "teacher_heldout.jsonl").read_text().splitlines()]
    assert greedy["prompts"] == [r["prompt"] for r in heldout]
    s = summary["settings"]
    dirs = {"teacher": ASSETS / "teacher", "sft": out / "sft" / "final", "minillm": out / "minillm" / "final"}
    for name, model_dir in dirs.items():
        expected = _independent_greedy(model_dir, greedy["prompts"], s["max_new_tokens"], s["max_prompt_length"],
                                       s["greedy_repetition_penalty"])
        assert greedy["answers"][name] == expected, name
    assert s["greedy_repetition_penalty"] == 1.3  # the default: the penalised path is the one checked here


def test_report_lists_prompts_best_answered_first_with_greedy_and_sampled_answers(tiny_demo):
    """The order, the per-prompt scores, the counts and the verdict, recomputed here from the answers."""
    from minillm.evaluation import rouge_l

    out, _, summary = tiny_demo
    greedy = json.loads((out / "greedy" / "answers.json").read_text())
    answers, n = greedy["answers"], len(greedy["prompts"])
    heldout = [json.loads(line) for line in (out / "data" / "heldout_prompts.jsonl").read_text().splitlines()]

    def judge(text: str, teacher: str) -> tuple[bool, float, float]:
        words = text.lower().split()
        grams = list(zip(words, words[1:], words[2:]))
        repeated = 1 - len(set(grams)) / len(grams) if grams else 0.0
        rouge = rouge_l([text], [teacher])
        return bool(text.strip()) and repeated <= 0.2 and rouge >= 20.0, rouge, repeated

    scores = {name: [judge(answers[name][i], answers["teacher"][i]) for i in range(n)] for name in ("sft", "minillm")}
    order = sorted(range(n), key=lambda i: (not scores["minillm"][i][0], -scores["minillm"][i][1],
                                            scores["minillm"][i][2], i))
    assert summary["greedy"]["order"] == order
    for name in ("sft", "minillm"):
        assert summary["greedy"]["counts"][name]["readable"] == sum(r[0] for r in scores[name])
    rouges = [scores["minillm"][i][1] for i in order]
    readable = [scores["minillm"][i][0] for i in order]
    assert readable == sorted(readable, reverse=True)  # readable answers first
    assert all(a >= b for a, b, ra, rb in zip(rouges, rouges[1:], readable, readable[1:]) if ra == rb)

    report = (out / "report.md").read_text()
    assert "## Held-out prompts, best-answered first" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "(`" in line and "|---" not in line]
    assert len(rows) == n
    for rank, (row, i) in enumerate(zip(rows, order), start=1):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(rank) and f"(`{heldout[i]['id']}`)" in cells[1]
        assert cells[2] == f"{scores['minillm'][i][1]:.1f}" and cells[3] == ("yes" if scores["minillm"][i][0] else "no")
        assert cells[4] == f"{scores['sft'][i][1]:.1f}" and cells[5] == ("yes" if scores["sft"][i][0] else "no")
    # each prompt's block, in the same order, holds every model's greedy answer beside its scored T = 1 sample
    (set_dir,) = [d for d in (out / "eval" / "teacher").iterdir() if d.is_dir()]
    blocks = [report.index(f"**{rank}. ") for rank in range(1, n + 1)]
    assert blocks == sorted(blocks)
    for rank, i in enumerate(order, start=1):
        block = report[blocks[rank - 1]:blocks[rank] if rank < n else len(report)]
        assert f"(`{heldout[i]['id']}`)" in block
        for name, label in (("teacher", "Teacher"), ("sft", "SFT student"), ("minillm", "MiniLLM student")):
            sampled = {s["prompt"]: s["output"] for s in json.loads(
                (out / "eval" / name / set_dir.name / "seed20.json").read_text())["samples"]}
            row = next(line for line in block.splitlines() if line.startswith(f"| {label} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[1] == (" ".join(answers[name][i].split()) or "*(empty)*")
            assert cells[2] == (" ".join(sampled[greedy["prompts"][i]].split()) or "*(empty)*")
    text = summary["verdict"]["text"]
    assert text in report
    mini_readable = summary["greedy"]["counts"]["minillm"]["readable"]
    assert f"{mini_readable} of {n} MiniLLM answers meet it" in text
    assert f"{summary['models']['minillm']['teacher_logprob']:.2f} nats/token under the teacher" in text



def test_changed_greedy_setting_reruns_only_the_greedy_stage(tiny_demo, monkeypatch, capsys):
    """Runs after the tests above that read the first run's answers: this one replaces them."""
    from minillm.demo.pipeline import Demo
    from minillm.demo.profiles import get_profile

    out, _, first = tiny_demo
    before = json.loads((out / "greedy" / "answers.json").read_text())["answers"]
    monkeypatch.chdir(ROOT)  # the tiny profile names its assets relative to the repository
    summary = Demo(get_profile("tiny", greedy_max_new_tokens=3), out, ROOT / ".cache" / "minillm" / "demo",
                   device="cpu").run()
    printed = capsys.readouterr().out
    assert printed.count("... cached") == len(STAGES) - 1
    assert [n for n in STAGES if summary["stages"][n]["cached"]] == STAGES[:-1]
    assert summary["models"] == first["models"]  # training and evaluation untouched
    after = json.loads((out / "greedy" / "answers.json").read_text())["answers"]
    prompts = json.loads((out / "greedy" / "answers.json").read_text())["prompts"]
    s = summary["settings"]
    dirs = {"teacher": ASSETS / "teacher", "sft": out / "sft" / "final", "minillm": out / "minillm" / "final"}
    for name in MODELS:  # greedy answers of at most 3 tokens: the start of the 16-token ones
        assert after[name] == _independent_greedy(dirs[name], prompts, 3, s["max_prompt_length"],
                                                  s["greedy_repetition_penalty"]), name
        assert all(b.startswith(a) for a, b in zip(after[name], before[name])), name
    assert after != before


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


def test_influence_layers_keep_the_highest_scores_in_order():
    assert influence_layers([0.9, 0.1, 0.3, 0.05, 0.8], 3) == [0, 2, 4]
    assert influence_layers([0.2, 0.2, 0.2], 2) == [0, 1]  # ties: the earlier layer
    assert influence_layers([0.5, 0.1], 2) == [0, 1]
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        influence_layers([0.5, 0.1], 3)


def test_block_influence_equals_one_minus_cosine_of_each_layers_input_and_output():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(2, 500, (n,), generator=gen).tolist() for n in (7, 12, 4)]
    # oracle: each sequence alone (no padding), the layers' outputs from hidden_states, the last one with the final
    # norm switched off (HF returns it normed); mean over all tokens of all sequences
    n = model.config.num_hidden_layers
    norm, model.model.norm = model.model.norm, torch.nn.Identity()
    total, tokens = [0.0] * n, 0
    with torch.no_grad():
        for seq in sequences:
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            for i in range(n):
                x, y = hs[i][0], hs[i + 1][0]
                total[i] += float(((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum())
            tokens += len(seq)
    model.model.norm = norm
    expected = [1 - c / tokens for c in total]
    got = block_influence(model, sequences, pad_id=0, batch_size=2)  # padded batches of 2 and 1
    assert got == pytest.approx(expected, abs=1e-9)
    assert all(0 < b < 2 for b in got)


def test_influence_choice_prunes_the_layers_of_highest_block_influence(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    calibration = [[5, 9, 33, 17, 2, 8], [40, 41, 42]]
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32).eval()
    scores = block_influence(teacher, calibration, pad_id=0)
    kept = prune_layers(ASSETS / "teacher", tmp_path / "s", 1, "influence", calibration)
    assert kept == [max(range(len(scores)), key=scores.__getitem__)]
    assert json.loads((tmp_path / "s" / "pruned_from.json").read_text())["kept_layers"] == kept
    with pytest.raises(ValueError, match="needs calibration"):
        prune_layers(ASSETS / "teacher", tmp_path / "t", 1, "influence")


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


def test_repeated_trigram_fraction():
    assert repeated_trigram_fraction("") == 0.0 and repeated_trigram_fraction("two words") == 0.0
    assert repeated_trigram_fraction("a b c d e") == 0.0
    assert repeated_trigram_fraction("a b c a b c") == pytest.approx(0.25)  # abc bca cab abc: 1 repeat of 4
    assert repeated_trigram_fraction("The the THE the the") == pytest.approx(2 / 3)


def test_judge_greedy_and_verdict_from_numbers():
    answers = {"teacher": ["Paris is the capital of France.", "Blue, because of Rayleigh scattering.", "4"],
               "sft": ["Paris is the capital.", "the the the the the the", ""],
               "minillm": ["Paris is the capital of France.", "Red and green and blue and red and green.", "4"]}
    judged = judge_greedy(answers)
    assert judged["counts"]["minillm"] == {"non_repetitive": 3, "on_topic": 2, "readable": 2, "empty": 0, "num": 3}
    assert judged["counts"]["sft"] == {"non_repetitive": 1, "on_topic": 1, "readable": 1, "empty": 1, "num": 3}
    assert judged["per_prompt"]["minillm"][0]["rougeL_vs_teacher"] == pytest.approx(100.0)
    models = {"teacher": {"parameters": 100, "teacher_logprob": -1.5, "reverse_kl_k3": 0.0, "rougeL": 30.0},
              "sft": {"parameters": 40, "teacher_logprob": -6.5, "reverse_kl_k3": 2.5, "rougeL": 10.0},
              "minillm": {"parameters": 40, "teacher_logprob": -5.25, "reverse_kl_k3": 1.75, "rougeL": 12.0}}
    text = verdict_text(models, judged, "What is the capital of France?", 6, 30)
    assert text.startswith("The students keep 6 of the teacher's 30 layers: 0.0 M parameters, 40 % of the")
    assert "-5.25 nats/token under the teacher against -6.50 for the SFT student (better)" in text
    assert "(3.75 nats/token short of it)" in text and "k3 is 1.75 against 2.50 (better)" in text
    assert "2 of 3 MiniLLM answers meet it (3 non-repetitive, 2 on topic), against 1 of 3 for the SFT" in text
    assert "best “What is the capital of France?”" in text
    assert "the other 1 prompt(s) get answers that are empty (0), repeat themselves (0) or drift from the teacher's " \
        "answer (1)" in text
    worse = {**models, "minillm": {**models["minillm"], "teacher_logprob": -7.0, "reverse_kl_k3": 3.0}}
    none = judge_greedy({**answers, "minillm": ["x y z x y z x y z", "", "no"]})
    text = verdict_text(worse, none, None, 6, 30)
    assert "(worse)" in text and "k3 is 3.00 against 2.50 (worse)" in text
    assert "none of its greedy answers meets the criterion" in text and "What it can do: answer" not in text
    assert "are empty (1), repeat themselves (1) or drift from the teacher's answer (3)" in text


def test_frontier_proxies_on_the_tiny_teacher(tmp_path):
    """The student-choice proxies: exact cross-entropy, k3 = 0 for the teacher against itself, an untied head that
    is a separate copy, and SFT that lowers the training loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.demo.frontier import _pairs, build_student, cross_entropy, sample_scores, sft

    tok = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    tok.pad_token = tok.pad_token or tok.eos_token
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32).eval()
    rows = [{"prompt": "Add 1 and 2.\n", "output": "3"}, {"prompt": "Repeat the word: moon\n", "output": "moon moon"},
            {"prompt": "What colour is the sky?\n", "output": "blue"}]
    pairs = _pairs(tok, rows, 96)
    expected = []
    with torch.no_grad():
        for prompt, response in pairs:
            logp = torch.log_softmax(teacher(torch.tensor([prompt + response])).logits[0], -1)
            expected += [-float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(response)]
    assert cross_entropy(teacher, pairs, tok.pad_token_id, batch_size=2) == pytest.approx(
        sum(expected) / len(expected), rel=1e-5)
    scores = sample_scores(teacher, teacher, tok, [r["prompt"] for r in rows], max_new_tokens=8,
                           max_prompt_length=96, seed=3)
    assert scores["reverse_kl_k3"] == pytest.approx(0.0, abs=1e-6) and scores["teacher_logprob"] < 0
    assert 3 <= scores["tokens"] <= 3 * 8
    # the tiny teacher has its own head; SmolLM2 ties it to the input embeddings: make a tied copy
    tied_teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32)
    tied_teacher.config.tie_word_embeddings = True
    tied_teacher.lm_head.weight = tied_teacher.get_input_embeddings().weight
    tied_teacher.save_pretrained(tmp_path / "tied-teacher")
    tok.save_pretrained(tmp_path / "tied-teacher")
    tied = build_student(tmp_path / "tied-teacher", tmp_path, 1, "outer", tied=True)
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    untied = build_student(tmp_path / "tied-teacher", tmp_path, 1, "outer", tied=False)
    vocab, hidden = tied.get_input_embeddings().weight.shape
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + vocab * hidden
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    before = cross_entropy(tied, pairs, tok.pad_token_id)
    sft(tied, pairs, tok.pad_token_id, steps=4, lr=3e-3, batch_size=3, seed=0)
    assert cross_entropy(tied, pairs, tok.pad_token_id) < before


def test_sft_answers_at_a_lower_temperature_keep_the_heldout_references_at_one(tiny_demo, tmp_path, monkeypatch):
    """profile.sft_temperature: the training/dev answers come from a generate call at that temperature, the
    held-out references (scored) from one at T = 1; at the default the stage keeps its old settings (caches)."""
    from minillm.demo.pipeline import Demo
    from minillm.demo.profiles import get_profile

    monkeypatch.chdir(ROOT)
    demo = Demo(get_profile("tiny", sft_temperature=0.5), tmp_path / "run", tmp_path / "cache", device="cpu")
    demo.stage_teacher()
    demo.stage_prompts()
    demo.stage_teacher_data()
    data = tmp_path / "run" / "data"

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (data / name).read_text().splitlines()]

    train_side = sorted(read("teacher_train_side.jsonl"), key=lambda r: r["index"])
    assert read("teacher_train.jsonl") + read("teacher_dev.jsonl") == train_side
    assert read("teacher_heldout.jsonl") == sorted(read("teacher_heldout_t1.jsonl"), key=lambda r: r["index"])
    assert [r["prompt"] for r in read("teacher_heldout.jsonl")] != [r["prompt"] for r in train_side[:16]]
    for name, temperature in (("teacher_train_side", 0.5), ("teacher_heldout_t1", 1.0)):
        meta = json.loads((data / f"{name}.jsonl.meta.json").read_text())
        assert meta["sampling"]["temperature"] == temperature and meta["sampling"]["do_sample"] is True
    record = json.loads((tmp_path / "run" / "stages" / "teacher-data.json").read_text())
    assert record["settings"]["sft_temperature"] == 0.5
    default_record = json.loads((tiny_demo[0] / "stages" / "teacher-data.json").read_text())
    assert "sft_temperature" not in default_record["settings"]  # default runs keep their cached answers
    assert not (tiny_demo[0] / "data" / "teacher_train_side.jsonl").exists()


def test_cli_sft_temperature_reaches_the_profile():
    from minillm.demo.cli import make_parser, profile_from_args

    parse = make_parser().parse_args
    assert profile_from_args(parse([])).sft_temperature == 1.0
    assert profile_from_args(parse(["--quick", "--sft-temperature", "0.7"])).sft_temperature == 0.7
    assert profile_from_args(parse(["--quick", "--sft-temperature", "0.7"])).name == "quick"
    with pytest.raises(SystemExit, match="--sft-temperature 0.0 must be in"):
        profile_from_args(parse(["--sft-temperature", "0"]))


def test_cli_student_layers_and_choice_reach_the_profile():
    from minillm.demo.cli import make_parser, profile_from_args

    parse = make_parser().parse_args
    default = profile_from_args(parse([]))
    assert (default.keep_layers, default.layer_choice) == (15, "influence")
    chosen = profile_from_args(parse(["--quick", "--student-layers", "15", "--layer-choice", "influence"]))
    assert (chosen.name, chosen.keep_layers, chosen.layer_choice) == ("quick", 15, "influence")
    with pytest.raises(SystemExit, match="--student-layers 0 must be at least 1"):
        profile_from_args(parse(["--student-layers", "0"]))


def test_influence_student_init_measures_on_the_teachers_training_answers(tiny_demo, tmp_path, monkeypatch):
    """layer_choice=influence: the student-init stage runs after the teacher data and keeps the layers that
    block_influence ranks highest on the first training answers (prompt + answer + EOS); its cache key includes
    the data, and the outer choice's does not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.demo.pipeline import CALIBRATION_ANSWERS, Demo
    from minillm.demo.profiles import get_profile

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    for part in ("data", "stages"):  # the tiny run's prompts and teacher answers, cached
        shutil.copytree(tiny_demo[0] / part, out / part)
    demo = Demo(get_profile("tiny", layer_choice="influence"), out, tmp_path / "cache", device="cpu")
    demo.stage_teacher()
    demo.stage_prompts()
    demo.stage_teacher_data()
    demo.stage_student_init()
    tok = AutoTokenizer.from_pretrained(ASSETS / "teacher")
    rows = [json.loads(line) for line in (out / "data" / "teacher_train.jsonl").read_text().splitlines()]
    calibration = [tok(r["prompt"] + r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for r in rows[:CALIBRATION_ANSWERS]]
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", dtype=torch.float32).eval()
    scores = block_influence(teacher, calibration, pad_id=tok.pad_token_id or 0)
    kept = json.loads((out / "student-init" / "pruned_from.json").read_text())["kept_layers"]
    assert kept == [max(range(len(scores)), key=scores.__getitem__)]
    record = json.loads((out / "stages" / "student-init.json").read_text())["settings"]
    assert record["choice"] == "influence" and record["calibration"] == CALIBRATION_ANSWERS and "data" in record
    default = json.loads((tiny_demo[0] / "stages" / "student-init.json").read_text())["settings"]
    assert "data" not in default


def test_plain_greedy_and_the_penalty_ignore_padding(tmp_path):
    """greedy_answers in batches (left padding) equals the unpadded reference, with θ = 1 and θ = 1.3, even when
    the pad token is EOS (HF's built-in penalty would then penalise EOS in padded rows only)."""
    from transformers import AutoTokenizer

    from minillm.demo.greedy import greedy_answers

    model_dir = tmp_path / "teacher"
    shutil.copytree(ASSETS / "teacher", model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(model_dir)
    rows = [json.loads(line) for line in (ROOT / "tests/assets/data/dev.jsonl").read_text().splitlines()][:6]
    prompts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") for r in rows]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # batches are padded
    answers = {}
    for penalty in (1.0, 1.3, 3.0):  # 3.0: a pad (= EOS) wrongly counted as seen would end padded rows later
        answers[penalty] = greedy_answers(model_dir, prompts, max_new_tokens=8, max_prompt_length=48, batch_size=3,
                                          repetition_penalty=penalty)
        assert answers[penalty] == _independent_greedy(model_dir, prompts, 8, 48, penalty), penalty
    assert answers[1.0] != answers[3.0]
