"""Each method end to end through the real CLI on the tiny assets; stop/resume equals an uninterrupted run.

A console-script process costs ~5-10 s of imports on 2 shared cores, so the CLI runs where the process is the point
(the output tree of a fresh run; a resume in a new process); the other runs call minillm.cli.train.run in-process.
Every run uses one intra-op thread (the tiny models only lose time to more), in-process and in the CLI alike, so
an in-process run and a CLI run of the same config give bitwise the same weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args, timeout=400):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", "minillm.cli.train", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}"
    return out


def run_in_process(*args):
    """``run_cli``'s run without a new interpreter: ``--config PATH`` then overrides (no pre-flight check)."""
    from minillm.cli.train import run
    from minillm.config import load_config

    assert args[0] == "--config", args
    assert run(load_config(args[1], list(args[2:]))) == 0


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def check_output_tree(run_dir, last_step):
    run_dir = Path(run_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    rows = metrics(run_dir)
    assert all("step" in r for r in rows)
    ckpt = run_dir / "checkpoints" / f"step-{last_step}"
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "model.safetensors").is_file()
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a temporary checkpoint folder was left behind"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("final", "best"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / name)
        AutoTokenizer.from_pretrained(run_dir / name)
        assert sum(p.numel() for p in model.parameters()) > 0
    return rows


def train_losses(rows):
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_method_end_to_end(method, tmp_path):
    out = tmp_path / method
    # sft through the console script, kd in-process: the process (arguments, pre-flight, exit status) is the same
    # for every method, and one costs ~5-10 s of imports on 2 cores
    launch = run_cli if method == "sft" else run_in_process
    launch("--config", f"configs/tiny/{method}.yaml", f"output_dir={out}", "train.max_steps=20",
           "train.eval_interval=10", "train.save_interval=10")
    rows = check_output_tree(out, 20)
    losses = train_losses(rows)
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses  # the loss falls
    dev = [r for r in rows if "dev/rougeL" in r]
    assert [r["step"] for r in dev] == [10, 20]
    assert all(0.0 <= r["dev/rougeL"] <= 100.0 and r["dev/loss"] > 0 for r in dev)
    # best/ is the checkpoint of the best dev step (Rouge-L maximised, the first of equals), not just some weights
    best_step = max(dev, key=lambda r: (r["dev/rougeL"], -r["step"]))["step"]
    best, at_step = weights(out / "best"), weights(out / "checkpoints" / f"step-{best_step}")
    assert best.keys() == at_step.keys() and all(torch.equal(best[k], at_step[k]) for k in best)
    other = weights(out / "checkpoints" / f"step-{30 - best_step}")  # the other evaluated step differs
    assert any(not torch.equal(best[k], other[k]) for k in best)
    # best-rougeL/ and best-loss/ (the official rules pick baselines by Rouge-L, the MiniLLM init by loss)
    loss_step = min(dev, key=lambda r: (r["dev/loss"], r["step"]))["step"]
    for folder, step in (("best-rougeL", best_step), ("best-loss", loss_step)):
        exported, at = weights(out / folder), weights(out / "checkpoints" / f"step-{step}")
        assert all(torch.equal(exported[k], at[k]) for k in exported), folder
    if method == "kd":
        assert all("train/kd" in r and "train/ce" in r for r in rows if "train/loss" in r)
    saved = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert saved["method"] == method and saved["train"]["gradient_accumulation_steps"] == 2


def test_seqkd_reads_teacher_generated_jsonl(tmp_path):
    """SeqKD trains on teacher samples written as {prompt, output} JSONL (the minillm-generate format)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.evaluation.generation import generate_texts

    tok = AutoTokenizer.from_pretrained(REPO / "tests/assets/teacher")
    teacher = AutoModelForCausalLM.from_pretrained(REPO / "tests/assets/teacher")
    from minillm.config import DataConfig
    from minillm.data import load_records, render_prompt

    records = load_records(str(REPO / "tests/assets/data/train.jsonl"))[:32]
    prompts = [render_prompt(r, tok, DataConfig().template) for r in records]
    tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    texts = generate_texts(teacher, tok, [enc], max_new_tokens=24, seed=1)
    path = tmp_path / "seqkd.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output": t}) + "\n" for p, t in zip(prompts, texts)))
    out = tmp_path / "seqkd"
    run_in_process("--config", "configs/tiny/seqkd.yaml", f"output_dir={out}", f"data.train={path}",
                   "train.max_steps=8", "train.eval_interval=8", "train.save_interval=8", "eval.rouge=false",
                   "train.select_best_by=loss")
    rows = check_output_tree(out, 8)
    assert train_losses(rows)[-1] < train_losses(rows)[0]


@pytest.mark.parametrize("config", ["kd", "minillm"])
def test_stop_and_resume_equals_uninterrupted(config, tmp_path):
    # kd: stops where it saves and evaluates; minillm (phases of 4 steps): stops mid-phase, inside a PPO epoch, and
    # the resumed run samples the next phase's rollouts
    steps = {"kd": ["train.max_steps=6", "train.save_interval=3", "train.eval_interval=3"],
             "minillm": ["train.max_steps=6", "train.save_interval=3", "train.eval_interval=4"]}[config]
    stop = 3
    common = ["--config", f"configs/tiny/{config}.yaml", *steps, "eval.num_prompts=8"]
    full, parted = tmp_path / "full", tmp_path / "parted"
    run_in_process(*common, f"output_dir={full}")
    run_in_process(*common, f"output_dir={parted}", f"train.stop_at_step={stop}")
    assert not (parted / "final").exists()
    run_cli(*common, f"output_dir={parted}", "--resume")  # a new process: only the checkpoint carries the state
    a, b = weights(full / "final"), weights(parted / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k}
                          for r in rows]
    assert strip(metrics(full)) == strip(metrics(parted))


def test_minillm_brings_the_student_closer_to_the_teacher(tmp_path):
    """Over training, the teacher's per-token log-likelihood of the student's own (pure, unmixed) samples
    rises and the k3 estimate of KL(q‖p) falls, on the same dev prompts and sampling seed."""
    out = tmp_path / "minillm"
    run_in_process("--config", "configs/tiny/minillm.yaml", f"output_dir={out}", "train.eval_at_start=true",
                   "train.eval_interval=16", "train.save_interval=16", "train.max_steps=32", "eval.num_prompts=32")
    rows = check_output_tree(out, 32)
    dev = [r for r in rows if "dev/teacher_logprob" in r]
    assert [r["step"] for r in dev] == [0, 16, 32]
    logp = [r["dev/teacher_logprob"] for r in dev]
    kl = [r["dev/reverse_kl_k3"] for r in dev]
    assert logp[0] < logp[1] < logp[2] and logp[2] > logp[0] + 1.0, logp
    assert kl[2] < kl[0], kl
    train = [r for r in rows if "train/loss" in r]
    assert all(k in train[0] for k in ("train/pg_loss", "train/single_step_kl", "train/pt_loss", "train/clip_fraction",
                                       "rollout/reward", "rollout/reverse_kl_k3", "time/rollout", "time/learn"))


def test_multi_process_cli_run_skips_native_teardown_only_when_distributed(monkeypatch):
    """A finished multi-rank run ends with os._exit (a rare gloo abort in C++ destructors would otherwise turn
    it into rc != 0); a single-process run, and run() called from a notebook, return normally."""
    import logging

    from minillm.cli import train as cli

    exits, shutdowns = [], []
    monkeypatch.setattr(cli, "run", lambda cfg, resume=None: 0)
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(logging, "shutdown", lambda: shutdowns.append(True))
    argv = ["--config", str(REPO / "configs/tiny/sft.yaml"), "strategy.backend=deepspeed"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(argv) == 0 and exits == [] and shutdowns == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli.main(argv)
    assert exits == [0] and shutdowns == [True]


def test_sft_dev_rouge_with_the_fast_engine_equals_hf_generate_when_greedy(tmp_path):
    """eval.engine: greedy dev answers are the same tokens with either sampler, so dev Rouge-L is equal; sampled,
    the fast engine gives a valid score too."""
    from minillm.cli.train import build_trainer
    from minillm.config import load_config
    from minillm.strategy import build_strategy

    cfg = load_config(str(REPO / "configs/tiny/kd.yaml"), [f"output_dir={tmp_path}", "eval.num_prompts=6",
                                                           "student.path=tests/assets/teacher",
                                                           "eval.max_new_tokens=10", "eval.do_sample=false"])
    strategy = build_strategy(cfg).setup()
    cfg.resolve(strategy.world_size)
    trainer = build_trainer(cfg, strategy)
    scores = {}
    for engine in ("hf", "fast"):
        cfg.eval.engine = engine
        scores[engine] = trainer._dev_rouge()
    assert scores["fast"] == scores["hf"] > 0  # the trained teacher as the student: answers overlap
    # ordering, not a range: the untrained student scores below the trained teacher on the same prompts
    random_cfg = load_config(str(REPO / "configs/tiny/kd.yaml"), [f"output_dir={tmp_path / 'r'}", "eval.num_prompts=6",
                                                                  "eval.max_new_tokens=10", "eval.do_sample=false"])
    random_student = build_trainer(random_cfg, build_strategy(random_cfg).setup())
    assert random_student._dev_rouge() < scores["hf"]
    cfg.eval.do_sample = True
    assert 0.0 <= trainer._dev_rouge() <= 100.0
