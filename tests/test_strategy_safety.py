"""Strategy behaviour that only a GPU run used to reveal, checked in one CPU process.

* device choice: the CUDA ordinal under launchers that show one GPU per task, the backend from the chosen device;
* collectives refuse tensors that are not on the strategy's device (gloo would take them, NCCL crashes);
* a failing bf16 sampling copy falls back to the model itself with one warning;
* fp16 loss-scale overflows are not NaN skips, unless the scale is at its minimum (a stand-in of DeepSpeed's fp16
  optimizer: DeepSpeed refuses fp16 on this CPU);
* a NaN micro-step under ZeRO-1/2 with accumulation 1 skips cleanly (real DeepSpeed engines, gloo, 1 rank);
* ZeRO-3 models load straight into shards and compute what the replicated ones compute;
* a DeepSpeed run without a launcher takes a free rendezvous port, so two of them on one machine do not collide.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from minillm.config import load_config
from minillm.models import load_model, tiny_llama
from minillm.strategy import (CollectiveDeviceError, DeepSpeedStrategy, HalfPrecisionCopy, LocalStrategy,
                              _pick_device, comm_backend, device_ordinal, single_process_rendezvous)
from minillm.trainers.common import MetricWindow, NanGuard, NonFiniteLossError, PhaseTimer, guarded_micro_step


def config(*overrides, name=None):
    os.chdir(REPO)  # recipe asset paths are relative to the repository
    base = [] if name else ["student.path=x"]
    return load_config(name, [*base, *overrides], world_size=1)


# ------------------------------------------------------------------------------ device choice
def fake_cuda(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("local_rank, count, ordinal", [(0, 1, 0), (3, 1, 0), (3, 4, 3), (3, 2, 1), (7, 8, 7)])
def test_cuda_ordinal_wraps_the_local_rank_over_the_visible_devices(monkeypatch, local_rank, count, ordinal):
    fake_cuda(monkeypatch, count)
    assert device_ordinal(local_rank, count) == ordinal
    assert _pick_device(config().strategy, local_rank) == torch.device("cuda", ordinal)  # device auto
    cpu = config("strategy.device=cpu").strategy
    assert _pick_device(cpu, local_rank) == torch.device("cpu")


def test_no_visible_cuda_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        device_ordinal(0, 0)


def test_backend_follows_the_chosen_device_not_the_node(monkeypatch):
    assert comm_backend(torch.device("cpu")) == "gloo"
    assert comm_backend(torch.device("cuda", 1)) == "nccl"
    # strategy.device=cpu on a GPU node: gloo and CPU tensors, not NCCL with CPU tensors
    import deepspeed

    fake_cuda(monkeypatch, 2)
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, timeout: seen.update(b=dist_backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    strategy = DeepSpeedStrategy(config("strategy.backend=deepspeed", "strategy.device=cpu")).setup()
    assert seen["b"] == "gloo" and strategy.device == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.update(d=device))
    strategy = DeepSpeedStrategy(config("strategy.backend=deepspeed", "strategy.device=cuda")).setup()
    assert seen["b"] == "nccl" and seen["d"] == strategy.device == torch.device("cuda", 1)


# ------------------------------------------------------------------------------ one real gloo process group
@pytest.fixture(scope="module")
def process_group():
    """A 1-rank gloo group for DeepSpeed engines in this process (a free port: other test runs share the box)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    DeepSpeedStrategy(config("strategy.backend=deepspeed", "strategy.device=cpu")).setup()
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def ds_strategy(*overrides, name=None):
    return DeepSpeedStrategy(config("strategy.backend=deepspeed", "strategy.device=cpu", *overrides,
                                    name=name)).setup()


# ------------------------------------------------------------------------------ collective device check
def test_collectives_refuse_tensors_off_the_strategy_device(process_group):
    strategy = ds_strategy()
    t = torch.tensor([2.0, 3.0])
    assert strategy.all_reduce(t, "sum") is t and t.tolist() == [2.0, 3.0]  # 1 rank: the sum is itself
    strategy.device = torch.device("meta")  # stands for this rank's GPU: gloo would reduce the CPU tensor silently
    with pytest.raises(CollectiveDeviceError, match=r"all_reduce.*is on cpu but the strategy's device is meta"):
        strategy.all_reduce(torch.ones(2), "max")
    local = LocalStrategy(config("strategy.device=cpu")).setup()
    assert local.all_reduce(t) is t
    with pytest.raises(CollectiveDeviceError, match="is on meta but the strategy's device is cpu"):
        local.all_reduce(torch.ones(1, device="meta"))


# ------------------------------------------------------------------------------ sampling copy fail-safe
def test_a_failing_sampling_copy_falls_back_to_the_model_with_one_warning(monkeypatch, caplog):
    strategy = LocalStrategy(config("student.dtype=bf16", "strategy.sampling_copy=true",
                                    "strategy.device=cpu")).setup()
    model = tiny_llama(50, seed=0)

    def fail(self):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(HalfPrecisionCopy, "refresh", fail)
    logging.getLogger("minillm").propagate = True
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with strategy.sampling_model(model) as m:
                assert m is model
    # by identity: pytest may hold the same record twice (once through a handler of the non-propagating "minillm"
    # logger that an earlier in-process run configured, once through the root); two emissions are two objects
    warnings = list({id(r): r for r in caplog.records if "strategy.sampling_copy" in r.getMessage()}.values())
    assert len(warnings) == 1 and "out of memory" in warnings[0].getMessage()


def test_errors_inside_the_sampling_block_still_propagate(monkeypatch):
    strategy = LocalStrategy(config("student.dtype=bf16", "strategy.sampling_copy=true",
                                    "strategy.device=cpu")).setup()
    with pytest.raises(ValueError, match="decode failed"):
        with strategy.sampling_model(tiny_llama(50, seed=0)):
            raise ValueError("decode failed")


# ------------------------------------------------------------------------------ fp16 overflow vs NaN skips
class FakeLossScaler:
    """DeepSpeed's DynamicLossScaler as far as the strategy sees it (hysteresis 1): overflow halves cur_scale down
    to min_scale."""

    def __init__(self, scale, min_scale=1.0):
        self.cur_scale, self.min_scale = float(scale), float(min_scale)

    def update_scale(self, overflow):
        if overflow:
            self.cur_scale = max(self.cur_scale / 2.0, self.min_scale)


class FakeFp16ZeroOptimizer:
    """The ZeRO-1/2 fp16 optimizer's surface: ``overflow`` after step, ``loss_scale``, ``loss_scaler``."""

    def __init__(self, scale):
        self.loss_scaler = FakeLossScaler(scale)
        self.overflow = False
        self.param_groups = [{"lr": 0.1}]

    @property
    def loss_scale(self):
        return self.loss_scaler.cur_scale


class FakeEngine:
    """Steps like DeepSpeedEngine.step with accumulation 1: the optimizer checks the scaled gradient, an
    overflow skips the step and lowers the scale; the norm is then reported as inf."""

    lr_scheduler = None

    def __init__(self, optimizer):
        self.optimizer, self.next_overflow = optimizer, False

    def is_gradient_accumulation_boundary(self):
        return True

    def backward(self, loss):
        pass

    def step(self):
        self.optimizer.overflow = self.next_overflow
        self.optimizer.loss_scaler.update_scale(self.next_overflow)

    def get_global_grad_norm(self):
        return float("inf") if self.optimizer.overflow else 0.5


def fake_trainer(strategy, limit):
    return SimpleNamespace(strategy=strategy, nan_guard=NanGuard(strategy, limit), window=MetricWindow(),
                           timer=PhaseTimer(), step=0)


def test_fp16_overflows_are_not_nan_skips_unless_the_scale_is_at_its_minimum(process_group):
    strategy = DeepSpeedStrategy(config("strategy.backend=deepspeed", "strategy.device=cpu", "student.dtype=fp16",
                                        "train.max_nan_skips=1"))
    engine = FakeEngine(FakeFp16ZeroOptimizer(scale=2.0 ** 11))
    strategy.model, strategy.optimizer = engine, engine.optimizer
    trainer = fake_trainer(strategy, limit=1)
    loss = torch.tensor(2.0)
    for i in range(5):  # five routine overflows (a healthy run probing its scale): 2^11 → 2^6
        engine.next_overflow = i % 2 == 0
        result = guarded_micro_step(trainer, loss, {"loss": 2.0})
        assert result.stepped and result.skipped == result.overflow == engine.next_overflow
    assert trainer.nan_guard.skipped == 0 and engine.optimizer.loss_scale == 2.0 ** 8
    engine.optimizer.loss_scaler.cur_scale = 1.0  # at the minimum an overflow is a real divergence
    engine.next_overflow = True
    result = guarded_micro_step(trainer, loss, {"loss": 2.0})
    assert result.skipped and not result.overflow and trainer.nan_guard.skipped == 1
    with pytest.raises(NonFiniteLossError):
        guarded_micro_step(trainer, loss, {"loss": 2.0})
    # a static loss scale never adapts: each of its overflows counts
    static = DeepSpeedStrategy(config("strategy.backend=deepspeed", "student.dtype=fp16", "strategy.device=cpu",
                                      "strategy.deepspeed_config=" + str(write_json({"fp16": {"loss_scale": 128}}))))
    engine = FakeEngine(FakeFp16ZeroOptimizer(scale=128.0))
    static.model, static.optimizer = engine, engine.optimizer
    engine.next_overflow = True
    assert not static.step().overflow


def write_json(data):
    import json
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


# ------------------------------------------------------------------------------ NaN micro-step under ZeRO-1/2
@pytest.mark.parametrize("stage", [1, 2])
def test_nan_micro_step_under_zero_with_accumulation_one_is_skipped_cleanly(process_group, stage):
    strategy = ds_strategy(f"strategy.zero_stage={stage}", "train.micro_batch_size=1", "train.global_batch_size=1",
                           "train.max_nan_skips=3")
    model = tiny_llama(50, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = strategy.prepare_student(model, optimizer, scheduler)
    trainer = fake_trainer(strategy, limit=3)
    ids = torch.randint(3, 50, (1, 9), generator=torch.Generator().manual_seed(1))

    def micro_step(poison=False):
        loss = engine(input_ids=ids, labels=ids).loss
        return guarded_micro_step(trainer, loss * float("nan") if poison else loss, {"loss": 0.0})

    def weights():
        return [p.detach().clone() for p in engine.module.parameters()]

    assert micro_step().stepped  # Adam now has momentum: a zero-gradient step would still move the weights
    before = weights()
    result = micro_step(poison=True)
    assert result.stepped and trainer.nan_guard.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # the skipped step moved nothing
    assert strategy.current_lr() == pytest.approx(1e-2)  # the learning rate is back for the next step
    assert micro_step().stepped and trainer.nan_guard.skipped == 1
    after = weights()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(p).all() for p in after)


# ------------------------------------------------------------------------------ sharded loading under ZeRO-3
def test_zero3_models_load_straight_into_shards_and_compute_the_same(process_group):
    from transformers.integrations import is_deepspeed_zero3_enabled

    from minillm import losses

    strategy = ds_strategy("strategy.zero_stage=3", "train.micro_batch_size=2", "train.global_batch_size=2",
                           name="configs/tiny/kd.yaml")
    cfg = strategy.run
    teacher = load_model(cfg.teacher, trainable=False, zero3_config=strategy.zero3_init_config(teacher=True))
    student = load_model(cfg.student, trainable=True, zero3_config=strategy.zero3_init_config())
    assert not is_deepspeed_zero3_enabled()  # the sharding config does not outlive the load
    for model in (teacher, student):
        params = list(model.parameters())
        assert params and all(hasattr(p, "ds_id") for p in params)
        assert all(p.numel() < p.ds_numel for p in params)  # this rank holds no full tensor
    assert not hasattr(next(load_model(cfg.teacher, trainable=False).parameters()), "ds_id")

    t_engine = strategy.prepare_teacher(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.0)
    s_engine = strategy.prepare_student(student, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1))
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100

    def kd_loss(s_model, t_model):
        with torch.no_grad():
            s, t = s_model(input_ids=ids).logits.float(), t_model(input_ids=ids).logits.float()
        return float(losses.pt_loss(s, labels, t, kd_ratio=0.5))

    ref = kd_loss(load_model(cfg.student, trainable=True).eval(), load_model(cfg.teacher, trainable=False))
    s_engine.eval()
    assert kd_loss(s_engine, t_engine) == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------------------------ launcher-less rendezvous
def test_launcher_less_rendezvous_takes_a_free_port_and_keeps_what_the_user_set():
    with socket.socket() as busy:  # the old fixed default, taken by someone else
        busy.bind(("127.0.0.1", 29517))
        busy.listen()
        got = single_process_rendezvous({})
        assert {k: got[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
            "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        port = int(got["MASTER_PORT"])
        assert port != 29517
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # it was free
    assert single_process_rendezvous({"MASTER_PORT": "1234"}) == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    # Ranks started by hand must agree on the port, so a hand-set world keeps the fixed default.
    assert single_process_rendezvous({"WORLD_SIZE": "2", "RANK": "1"}) == {
        "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}


SETUP_AND_HOLD = """
import sys, time
from minillm.config import load_config
from minillm.strategy import DeepSpeedStrategy
strategy = DeepSpeedStrategy(load_config(None, ["student.path=x", "strategy.backend=deepspeed",
                                                "strategy.device=cpu"], world_size=1)).setup()
print("ready", flush=True)
sys.stdin.read()  # hold the rendezvous port until the test has started the other one
strategy.cleanup()
"""


def test_two_launcher_less_deepspeed_runs_on_one_machine_both_start():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-c", SETUP_AND_HOLD], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        lines = [p.stdout.readline() for p in procs]  # both hold their process group at the same time
        outputs = [p.communicate(input="", timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert lines == ["ready\n", "ready\n"], [o[1][-2000:] for o in outputs]
    assert [p.returncode for p in procs] == [0, 0]
