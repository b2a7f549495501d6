"""DeepSpeed on 2 CPU processes (gloo): ZeRO-1 and ZeRO-3 give the same losses as the local strategy.

Micro-batches of one sequence make the comparison exact up to fp32 summation order: the optimizer step
averages the same per-sequence token-mean losses whether they come from 4 accumulation steps in one process
or 2 accumulation steps on each of 2 ranks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed


def clean_env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def launch(args, nproc, timeout=500):
    if nproc == 1:
        cmd = [sys.executable, "-m", "minillm.cli.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "minillm.cli.train", *args]
    out = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}"


def losses(run_dir, key="train/loss"):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


COMMON = {
    # dev loss at step 6 over 33 dev records: 17 + 16 on two ranks, i.e. 2 + 1 batches of 16 unless padded (a
    # ZeRO-3 rank that runs fewer forwards than the other would hang in the parameter gathers)
    "kd": ["--config", "configs/tiny/kd.yaml", "train.max_steps=6", "train.micro_batch_size=1",
           "train.global_batch_size=4", "train.eval_interval=6", "train.save_interval=0", "logging.log_interval=1",
           "optim.scheduler=constant", "eval.rouge=false", "train.select_best_by=loss", "data.max_dev_records=33",
           "eval.batch_size=16"],
    # One optimizer step covers a whole rollout buffer (8 rollouts: 8 micro-batches locally, 4 per rank on 2
    # ranks), so each step sums the same per-sequence losses in both layouts. The interleaved prompt sharding
    # gives both layouts the same prompts per phase (and the same pre-training chunks per step); greedy
    # decoding of p̃ (teacher mixing on) makes the rollouts depend on the prompts only. Whitening is off because
    # its statistics cover one micro-batch (1 row locally, 1 row per rank = 2 rows all-reduced on 2 ranks).
    "minillm": ["--config", "configs/tiny/minillm.yaml", "train.max_steps=4", "train.micro_batch_size=1",
                "train.global_batch_size=8", "rollout.num_rollouts=8", "rollout.chunk_size=4",
                "train.eval_interval=4", "train.save_interval=0", "logging.log_interval=1", "minillm.ppo_epochs=2",
                "rollout.teacher_mix_alpha=0.2", "rollout.do_sample=false", "minillm.whiten=none",
                # greedy dev evaluation of 5 prompts: 3 + 3 on two ranks, the last one a padding repeat
                "eval.num_prompts=5", "eval.do_sample=false", "eval.max_new_tokens=8", "eval.batch_size=2"],
}


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The local-strategy references, run in this process (minillm.cli.train.run): the 2-rank runs are compared
    with their numbers, so a console-script process (~5-10 s of imports each) would add nothing. One intra-op
    thread, like the ranks (OMP_NUM_THREADS=1)."""
    import torch

    from minillm.cli.train import run
    from minillm.config import load_config

    root = tmp_path_factory.mktemp("local")
    runs = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, args in COMMON.items():
            assert args[0] == "--config"
            assert run(load_config(args[1], [*args[2:], f"output_dir={root / name}"])) == 0
            runs[name] = root / name
    finally:
        torch.set_num_threads(before)
    return runs


@pytest.mark.parametrize("stage", [1, 3])
def test_kd_zero_matches_local(stage, tmp_path, local_runs):
    out = tmp_path / f"zero{stage}"
    launch([*COMMON["kd"], f"output_dir={out}", "strategy.backend=deepspeed", f"strategy.zero_stage={stage}"], nproc=2)
    ref, got = losses(local_runs["kd"]), losses(out)
    assert [s for s, _ in ref] == [s for s, _ in got] == list(range(1, 7))
    for (_, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    (_, a), = losses(local_runs["kd"], "dev/loss")
    (_, b), = losses(out, "dev/loss")
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)  # token mean over the 33 records, the padding repeat unseen
    assert (out / "final" / "model.safetensors").is_file()


def test_minillm_zero3_student_and_teacher_match_local(tmp_path, local_runs):
    """Rollout (teacher-mixed, parameters gathered), scoring, PPO, single-step KL and PT loss under ZeRO-3 for
    both models on 2 ranks give the local strategy's losses step by step: 4 steps = 2 rollout phases."""
    out = tmp_path / "zero3"
    launch([*COMMON["minillm"], f"output_dir={out}", "strategy.backend=deepspeed", "strategy.zero_stage=3"], nproc=2)
    for key in ("train/loss", "train/pg_loss", "train/single_step_kl", "train/pt_loss", "rollout/reward"):
        ref, got = losses(local_runs["minillm"], key), losses(out, key)
        assert [s for s, _ in ref] == [s for s, _ in got] == [1, 2, 3, 4], key
        for (_, a), (_, b) in zip(ref, got):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5), key
    # dev metrics over an uneven split: the padding repeat on rank 1 must not count
    for key in ("dev/rougeL", "dev/reverse_kl_k3", "dev/teacher_logprob"):
        ref, got = losses(local_runs["minillm"], key), losses(out, key)
        assert [s for s, _ in ref] == [s for s, _ in got] == [4], key
        assert got[0][1] == pytest.approx(ref[0][1], rel=1e-4, abs=1e-5), key
    assert (out / "final" / "model.safetensors").is_file()


def test_kd_from_a_teacher_cache_on_two_ranks_matches_the_online_local_run(tmp_path, local_runs):
    """kd.teacher_cache (k = V, fp32) under ZeRO-1 on 2 ranks: each rank reads its own examples' rows by dataset
    index, no rank loads the teacher, and the losses are the local online-teacher run's."""
    from minillm.cli.teacher_cache import main as build_cache

    os.chdir(REPO)
    cache = tmp_path / "cache"
    assert build_cache(["--config", "configs/tiny/kd.yaml", "--top-k", "512", "--storage", "fp32", "--out", str(cache),
                        "--no-progress"]) == 0
    out = tmp_path / "cached"
    launch([*COMMON["kd"], f"output_dir={out}", "strategy.backend=deepspeed", "strategy.zero_stage=1",
            f"kd.teacher_cache={cache}"], nproc=2)
    ref, got = losses(local_runs["kd"]), losses(out)
    assert [s for s, _ in ref] == [s for s, _ in got] == list(range(1, 7))
    for (_, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_minillm_with_sampling_and_global_whitening_same_final_weights_under_zero0_and_zero3(tmp_path):
    """What users run: sampled teacher-mixed rollouts and the reference's global whitening (statistics all-reduced
    over both ranks). ZeRO-0 (replicated weights) and ZeRO-3 (student and teacher sharded, gathered for generation)
    draw the same per-rank samples from the same seeds, so their final weights must agree, not only their logs."""
    from safetensors.torch import load_file

    args = ["--config", "configs/tiny/minillm.yaml", "train.max_steps=4", "train.micro_batch_size=1",
            "train.global_batch_size=8", "rollout.num_rollouts=8", "rollout.chunk_size=4", "minillm.ppo_epochs=2",
            "rollout.teacher_mix_alpha=0.2", "rollout.do_sample=true", "minillm.whiten=global",
            "train.eval_interval=0", "train.save_interval=0", "logging.log_interval=1", "train.select_best_by=none",
            "strategy.backend=deepspeed"]
    finals = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        launch([*args, f"output_dir={out}", f"strategy.zero_stage={stage}"], nproc=2)
        finals[stage] = load_file(str(out / "final" / "model.safetensors"))
        assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    start = load_file(str(REPO / "tests" / "assets" / "student" / "model.safetensors"))
    assert finals[0].keys() == finals[3].keys()
    moved = max(float((finals[0][k].float() - start[k].float()).abs().max()) for k in start if k in finals[0])
    differ = max(float((finals[0][k].float() - finals[3][k].float()).abs().max()) for k in finals[0])
    assert moved > 1e-3 and differ <= 1e-4 * max(1.0, moved), (moved, differ)
