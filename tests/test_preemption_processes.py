"""Preemption with real processes (issue 18): kill -9 at random moments, one of them in the middle of a checkpoint,
then `--resume auto`, equals an uninterrupted run (weights bitwise, metrics rows); SIGTERM to one of two DeepSpeed
gloo ranks (torchrun) stops both at the same step, mid-phase, with a checkpoint they resume from."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import list_checkpoints, load_trainer_state

REPO = Path(__file__).resolve().parent.parent
DRIVER = str(REPO / "tests" / "preempt_driver.py")
# 8 steps = 2 phases of 4 (16 rollouts, micro-batches of 4, 2 PPO epochs, 2 micro-steps per optimizer step)
MINILLM = ["--config", "configs/tiny/minillm.yaml", "train.max_steps=8", "train.save_interval=2",
           "train.eval_interval=0", "logging.log_interval=1", "rollout.max_new_tokens=8", "rollout.num_rollouts=16",
           "rollout.chunk_size=8", "train.micro_batch_size=4", "train.global_batch_size=8", "data.pretrain=null",
           "--no-preflight"]


def env(**extra):
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        out.pop(key, None)
    return out


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and "per_s" not in k}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def row_count(out):
    try:
        return len((Path(out) / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def start(args, **extra):
    return subprocess.Popen([sys.executable, DRIVER, *args], cwd=REPO, env=env(**extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, process, timeout=120):
    end = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before the moment to kill it:\n"
                                 f"{process.stderr.read()[-3000:]}")
        assert time.monotonic() < end, "timed out waiting for the moment to kill the run"
        time.sleep(0.02)


def kill9(process):
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.wait(30)
    process.stderr.close()


@pytest.mark.usefixtures("one_thread")
def test_kill_9_at_random_moments_including_mid_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    from minillm.cli.train import run
    from minillm.config import load_config

    full = tmp_path / "full"
    assert run(load_config(MINILLM[1], [*MINILLM[2:-1], f"output_dir={full}"])) == 0
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out = tmp_path / "parted"
    args = [*MINILLM, f"output_dir={out}"]
    note = f"(random seed {seed})"

    # 1. at a random moment of the first steps, maybe before the first checkpoint (then auto starts fresh)
    first = rng.randint(1, 4)
    p = start(args)
    wait_until(lambda: row_count(out) >= first, p)
    kill9(p)
    # 2. in the middle of a checkpoint (weights written, trainer state not yet): a .tmp-step-N folder exists.
    # Kill 1 may itself have hit a save and left a stale .tmp-step-N (complete but for the rename); only folders
    # this run writes count, i.e. ones modified after it started (a rewrite of the same name is recreated).
    started = time.time_ns()
    p = start([*args, "--resume", "auto"], SLOW_SAVE="1.5")

    def tmp_dirs():
        root = out / "checkpoints"
        found = []
        for d in root.glob(".tmp-step-*") if root.is_dir() else ():
            try:
                if d.stat().st_mtime_ns >= started:
                    found.append(d)
            except FileNotFoundError:  # being replaced right now
                pass
        return found

    wait_until(lambda: bool(tmp_dirs()), p)
    time.sleep(rng.uniform(0.1, 1.0))
    half = tmp_dirs()
    kill9(p)
    assert half and not (half[0] / "trainer_state.pt").exists(), note
    complete = [step for step, _ in list_checkpoints(out)]
    assert int(half[0].name.rsplit("-", 1)[1]) not in complete, note  # never taken for a complete checkpoint
    # 3. a random moment after the resume, then to the end
    p = start([*args, "--resume", "auto"])
    target = row_count(out) + rng.randint(1, 2)
    wait_until(lambda: row_count(out) >= target, p)
    kill9(p)
    done = subprocess.run([sys.executable, DRIVER, *args, "--resume", "auto"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = final_weights(full), final_weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs {note}"
    assert rows(out) == rows(full), f"metrics rows differ {note}"


def rank_pids(launcher):
    """The worker processes of a torchrun launcher, by RANK."""
    found = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == launcher.pid:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(child.name)
    return found


@pytest.mark.distributed
def test_sigterm_to_one_of_two_deepspeed_ranks_stops_both_mid_phase_and_they_resume(tmp_path):
    """SIGTERM reaches rank 1 only (as when a scheduler signals one node): the all-reduced stop flag makes rank 0
    stop after the same optimizer step; both write their part of one checkpoint (RNG, rollout buffer) and exit 75;
    `--resume auto` on two ranks then finishes with every step logged exactly once."""
    out = tmp_path / "run"
    args = ["--standalone", "--nproc_per_node=2", DRIVER, *MINILLM, f"output_dir={out}", "train.save_interval=0",
            "train.max_steps=6", "strategy.backend=deepspeed", "strategy.zero_stage=1",
            "train.micro_batch_size=2"]  # 8 rollouts per rank, 4 micro-steps per PPO epoch, 4 steps per phase
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=REPO, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: row_count(out) >= 1, launcher, timeout=240)
        pids = rank_pids(launcher)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGTERM)
        output, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0  # torchrun reports a worker's non-zero status as a failure
    assert "exitcode  : 75" in output or "exitcode: 75" in output, output[-4000:]
    assert "SIGTERM received" in output
    # the last line of train.log, which the README's job script reads to requeue
    assert "exit status 75" in (out / "train.log").read_text().splitlines()[-1]
    (step, ckpt), = list_checkpoints(out)
    assert 1 <= step < 6 and not (out / "final").exists()
    state = load_trainer_state(ckpt)
    assert state["step"] == step and state["world_size"] == 2
    assert {p.name for p in ckpt.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    if step % 4:  # mid-phase: each rank's share of the rollout buffer
        assert {p.name for p in ckpt.glob("rollout-rank*.pt")} == {"rollout-rank0.pt", "rollout-rank1.pt"}
    assert [r["step"] for r in rows(out)] == list(range(1, step + 1))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args, "--resume", "auto"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert [r["step"] for r in rows(out)] == list(range(1, 7))
    assert (out / "final" / "model.safetensors").is_file()
