"""Two CPU ranks (gloo, torchrun): runs that used to hang on a GPU node must finish, or fail promptly.

ZeRO-3 with sampled generation: rollouts, student samples and dev answers finish.

Under ZeRO-3 ranks decode different numbers of tokens (per-rank sampling seeds, rows that stop at different
steps). With DeepSpeed's module hooks installed during generation every forward joins collectives, so the first
rank to stop left the other waiting forever (the minillm command below logged no step in 300 s). The strategy now
removes the hooks while the parameters are gathered for generation; these runs must finish well inside the
timeout and log every step.

A rank that raises: the other ranks are inside some collective. ``cleanup`` used to barrier while the exception
unwound, so the failing rank hung there too (on NCCL for the 30-minute collective timeout, its error unseen). Now
it tears the process group down without a barrier and exits, and the launcher stops the others.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_deepspeed import REPO, clean_env

pytestmark = pytest.mark.distributed

TIMEOUT = 240  # a hang shows up as a failure, not as a stuck test session


def run_bounded(cmd, timeout, env=None):
    """(returncode, stdout, stderr) of a torchrun ``cmd``; past ``timeout`` the test fails instead of hanging.

    torchrun starts its workers in sessions of their own, so on timeout it gets SIGTERM (it stops its workers
    then) before a SIGKILL of its own group; output goes to files, which orphaned workers cannot hold open.
    """
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or clean_env(), stdout=out, stderr=err, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        pytest.fail(f"no exit within {timeout} s (hung)\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}")
    return proc.returncode, stdout, stderr


def run_two_ranks(args, timeout=TIMEOUT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minillm.cli.train", *args]
    rc, out, err = run_bounded(cmd, timeout)
    assert rc == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"


def rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_minillm_zero3_with_sampled_rollouts_and_dev_rouge_finishes(tmp_path):
    """The tiny recipe as shipped (do_sample on, teacher mixing α = 0.2 so both ZeRO-3 models decode, dev
    Rouge-L with sampling on, best-by-rougeL export), 4 steps with dev evaluation at steps 2 and 4."""
    out = tmp_path / "run"
    run_two_ranks(["--config", "configs/tiny/minillm.yaml", "strategy.backend=deepspeed", "strategy.zero_stage=3",
                   "train.max_steps=4", "train.eval_interval=2", "train.save_interval=0", "logging.log_interval=1",
                   f"output_dir={out}"])
    logged = rows(out)
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in logged if "dev/rougeL" in r] == [2, 4]
    assert all(0.0 <= r["dev/rougeL"] <= 100.0 for r in logged if "dev/rougeL" in r)
    assert (out / "final" / "model.safetensors").is_file() and (out / "best").is_dir()


WORKER = r"""
import json, sys
import torch
from minillm.config import load_config
from minillm.models import tiny_llama
from minillm.strategy import DeepSpeedStrategy

ds_json, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["student.path=x", "strategy.backend=deepspeed", "strategy.zero_stage=3",
                         "strategy.device=cpu", "train.micro_batch_size=1", "train.global_batch_size=2",
                         f"strategy.deepspeed_config={ds_json}"], world_size=2)
strategy = DeepSpeedStrategy(cfg).setup()
student, teacher = tiny_llama(seed=0), tiny_llama(seed=1).eval().requires_grad_(False)
opt = torch.optim.SGD(student.parameters(), lr=0.1)
engine = strategy.prepare_student(student, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
t_engine = strategy.prepare_teacher(teacher)
ids = torch.tensor([[5, 6, 7, 8, 9]])

def train_step():
    loss = engine(input_ids=ids, labels=ids).loss
    strategy.backward(loss)
    strategy.step()
    return float(loss)

hooks = [len(strategy._zero3_offload(e).forward_hooks) for e in (engine, t_engine)]
losses = [train_step()]
# ranks decode different numbers of tokens, as sampling does: rank 0 one forward per model, rank 1 five
with torch.no_grad(), strategy.sampling_model(engine) as s, strategy.gathered(t_engine) as t:
    for _ in range(1 + 4 * strategy.rank):
        logits = s(input_ids=ids).logits + t(input_ids=ids).logits
    full = [tuple(p.shape) == tuple(p.ds_shape) for p in (*s.parameters(), *t.parameters())]
losses.append(train_step())  # the hooks are back: a ZeRO-3 training step after generation
with torch.no_grad():
    teacher_logits = t_engine(input_ids=ids).logits  # and the teacher engine's hooked forward
with strategy.gathered(engine) as m:
    checksum = sum(float(p.double().sum()) for p in m.parameters())
record = {"losses": losses, "checksums": strategy.all_gather_object(checksum), "all_full": all(full),
          "hooks_before": hooks, "hooks_after": [len(strategy._zero3_offload(e).forward_hooks)
                                                  for e in (engine, t_engine)],
          "teacher_logit_sum": float(teacher_logits.double().sum())}
if strategy.is_main:
    json.dump(record, open(out, "w"))
strategy.cleanup()
"""


def test_zero3_ranks_may_run_different_numbers_of_forwards_inside_generation_contexts(tmp_path):
    """Both kinds of ZeRO-3 engine (the training student, the frozen teacher) with every parameter partitioned
    (persistence threshold 0: each submodule forward would all-gather): inside ``sampling_model`` /
    ``gathered`` rank 0 runs 1 forward and rank 1 runs 5, and the run goes on. Training afterwards gives the
    plain-torch numbers (the hooks are back), identical weights on both ranks."""
    import torch

    from minillm.models import tiny_llama

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), str(ds_json), str(out)]
    env = {**clean_env(), "PYTHONPATH": str(REPO)}
    rc, stdout, stderr = run_bounded(cmd, 120, env)
    assert rc == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}"
    got = json.loads(out.read_text())
    assert got["all_full"]  # full parameters inside the context
    assert got["hooks_after"] == got["hooks_before"] and min(got["hooks_before"]) > 0
    a, b = got["checksums"]
    assert a == b

    # plain torch: the same two SGD steps (both ranks see the same sequence: the average is one gradient)
    model = tiny_llama(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ref = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        ref.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # optim.clip_grad default, DeepSpeed clips too
        opt.step()
        opt.zero_grad()
    assert got["losses"] == pytest.approx(ref, rel=1e-5)
    assert a == pytest.approx(sum(float(p.double().sum()) for p in model.parameters()), rel=1e-6)
    with torch.no_grad():
        t_ref = float(tiny_llama(seed=1)(input_ids=ids).logits.double().sum())
    assert got["teacher_logit_sum"] == pytest.approx(t_ref, rel=1e-5)


FAILING = r"""
import sys
import minillm.cli.train as cli

build = cli.build_trainer


def build_then_fail_on_rank_1(cfg, strategy):
    trainer = build(cfg, strategy)  # collective engine set-up on both ranks, then rank 1 dies; rank 0 trains on
    if strategy.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    return trainer


cli.build_trainer = build_then_fail_on_rank_1
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_failing_rank_exits_promptly_with_its_error_and_the_job_fails(tmp_path):
    (tmp_path / "failing.py").write_text(FAILING)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "failing.py"), "--config", "configs/tiny/kd.yaml", "strategy.backend=deepspeed",
           "strategy.zero_stage=1", "train.max_steps=2", "train.eval_interval=0", "train.save_interval=0",
           f"output_dir={tmp_path / 'run'}"]
    rc, out, err = run_bounded(cmd, 120, {**clean_env(), "PYTHONPATH": str(REPO)})
    assert rc != 0
    assert "RuntimeError: injected failure on rank 1" in err  # the real error, not a timeout
    assert "local_rank: 1" in err and "exitcode  : 1" in err  # the launcher reports rank 1 as the failure
