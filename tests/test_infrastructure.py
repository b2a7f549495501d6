"""Schedules, RNG capture, atomic checkpoints, metrics logging, vocabulary alignment, local strategy."""

import json
import math
import random

import numpy as np
import pytest
import torch

from minillm.checkpoint import (AtomicDir, list_checkpoints, prune_checkpoints, resolve_resume_dir, rng_state,
                                set_rng_state)
from minillm.config import LoggingConfig, OptimConfig, load_config
from minillm.models import (ModelCompatibilityError, VocabAlignment, check_compatibility, teacher_precision_advice,
                            tiny_llama)
from minillm.optim import build_optimizer, lr_multiplier, parameter_groups
from minillm.strategy import LocalStrategy
from minillm.tracking import MetricsLogger, read_metrics


class Solo:
    """A one-process stand-in for the strategy's rank/barrier interface."""

    is_main, rank, world_size = True, 0, 1

    def barrier(self):
        pass


def test_lr_schedules_hand_values():
    const = OptimConfig(lr=1.0, scheduler="constant", warmup_steps=4)
    assert [lr_multiplier(s, const, 100) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    cos = OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=0, min_lr=0.0)
    assert lr_multiplier(0, cos, 10) == pytest.approx(1.0)
    assert lr_multiplier(5, cos, 10) == pytest.approx(0.5)
    assert lr_multiplier(10, cos, 10) == pytest.approx(0.0, abs=1e-12)
    floor = OptimConfig(lr=1e-3, scheduler="cosine", min_lr=1e-7)
    assert lr_multiplier(10, floor, 10) == pytest.approx(1e-4)  # ends at min_lr / lr
    lin = OptimConfig(lr=1.0, scheduler="linear", warmup_steps=2)
    assert lr_multiplier(2, lin, 10) == 1.0 and lr_multiplier(6, lin, 10) == pytest.approx(0.5)
    noam = OptimConfig(lr=1.0, scheduler="noam", warmup_steps=4)
    assert lr_multiplier(15, noam, 100) == pytest.approx(math.sqrt(4 / 16))


def test_weight_decay_groups_exclude_vectors():
    model = tiny_llama(vocab_size=32, hidden_size=16)
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0
    opt = build_optimizer(model, OptimConfig(lr=1e-3, betas=[0.9, 0.95]))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(torch.load(_save(state), weights_only=True))
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_atomic_dir_and_checkpoint_listing(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        with AtomicDir(root / f"step-{step}", Solo()) as tmp:
            (tmp / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(RuntimeError):
        with AtomicDir(root / "step-6", Solo()) as tmp:
            (tmp / "trainer_state.pt").write_bytes(b"x")
            raise RuntimeError("crash while saving")
    assert (root / ".tmp-step-6").exists() and not (root / "step-6").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]  # the half-written one is ignored
    assert resolve_resume_dir(None, tmp_path) == root / "step-4"
    assert resolve_resume_dir(str(root / "step-2"), tmp_path) == root / "step-2"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_dir(None, tmp_path / "elsewhere")
    (root / ".old-step-2").mkdir()  # a kill between the two renames of a rewrite
    prune_checkpoints(tmp_path, keep=-1, is_main=False)  # only rank 0 deletes
    assert (root / ".tmp-step-6").exists() and (root / ".old-step-2").exists()
    prune_checkpoints(tmp_path, keep=-1, is_main=True)  # keep all complete ones, but sweep the leftovers
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]
    prune_checkpoints(tmp_path, keep=1, is_main=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_metrics_logger_jsonl_and_truncate(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(), is_main=True)
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": 1.0 / step, "bad": float("nan"), "t": torch.tensor(2.5)})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["bad"] == "nan" and rows[0]["t"] == 2.5
    logger.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_metrics_logger_mirrors_numbers_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """The optional trackers get every numeric value with its step (stand-in modules: neither is installed in
    the test environment); strings (non-finite values) stay in metrics.jsonl only."""
    import sys
    import types

    scalars, wandb_calls = [], {}

    class Writer:
        def __init__(self, logdir):
            wandb_calls["tb_dir"] = logdir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            wandb_calls["tb_closed"] = True

    class Run:
        def log(self, values, step):
            wandb_calls.setdefault("logged", []).append((values, step))

        def finish(self):
            wandb_calls["finished"] = True

    def init(**kwargs):
        wandb_calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = LoggingConfig(tensorboard=True, wandb=True, wandb_project="p")
    logger = MetricsLogger(tmp_path, cfg, is_main=True, run_name="run", config={"seed": 1})
    logger.log(3, {"train/loss": 0.5, "bad": float("inf")})
    logger.close()
    assert scalars == [("train/loss", 0.5, 3)]
    assert wandb_calls["init"] == {"project": "p", "name": "run", "config": {"seed": 1}, "resume": "allow"}
    assert wandb_calls["logged"] == [({"train/loss": 0.5}, 3)]
    assert wandb_calls["tb_dir"] == str(tmp_path / "tensorboard")
    assert wandb_calls["tb_closed"] and wandb_calls["finished"]
    assert read_metrics(tmp_path) == [{"step": 3, "train/loss": 0.5, "bad": "inf"}]
    off_rank = MetricsLogger(tmp_path / "r1", cfg, is_main=False)  # other ranks open no tracker and write nothing
    off_rank.log(3, {"train/loss": 1.0})
    assert not (tmp_path / "r1").exists() and len(scalars) == 1


class Tok:
    def __init__(self, n, eos=1, shift=0):
        self.n, self.eos_token_id, self.shift = n, eos, shift

    def __len__(self):
        return self.n

    def get_vocab(self):
        return {f"t{i + self.shift}": i for i in range(self.n)}


def test_vocab_alignment_trims_padded_rows():
    student = tiny_llama(vocab_size=40, hidden_size=16)
    teacher = tiny_llama(vocab_size=48, hidden_size=16)  # padded embedding matrix, as Qwen's 7B vs 1.5B
    align = check_compatibility(student, teacher, Tok(36))
    assert align == VocabAlignment(vocab_size=36, student_rows=40, teacher_rows=48)
    assert align.trim(torch.zeros(2, 3, 48)).shape == (2, 3, 36)
    with pytest.raises(ModelCompatibilityError, match="tokenizers map tokens differently"):
        check_compatibility(student, teacher, Tok(36), Tok(36, shift=1))
    with pytest.raises(ModelCompatibilityError, match="output rows"):
        check_compatibility(student, teacher, Tok(44))
    with pytest.raises(ModelCompatibilityError, match="EOS differs"):
        check_compatibility(student, teacher, Tok(36), Tok(36, eos=2))


def test_teacher_precision_advice_only_for_an_fp32_teacher_beside_a_half_precision_gpu_run():
    advice = teacher_precision_advice("bf16", "fp32", "cuda")
    assert "teacher.dtype=bf16" in advice and "twice the memory" in advice
    assert "teacher.dtype=fp16" in teacher_precision_advice("fp16", "fp32", "cuda")
    for args in (("bf16", "fp32", "cpu"), ("fp32", "fp32", "cuda"), ("bf16", "bf16", "cuda")):
        assert teacher_precision_advice(*args) is None, args


def test_local_strategy_accumulates_and_clips(tmp_path):
    cfg = load_config(None, ["student.path=x", "train.micro_batch_size=1", "train.global_batch_size=2",
                             "optim.clip_grad=0.5", "optim.scheduler=constant", "strategy.device=cpu"])
    strategy = LocalStrategy(cfg).setup()
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    strategy.prepare_student(model, opt, sched)
    x = torch.tensor([[1.0, 2.0, 2.0]])
    strategy.backward(model(x).sum())  # grad = x / 2 (accumulation of 2)
    assert not strategy.step().stepped
    strategy.backward(model(x).sum())
    result = strategy.step()
    assert result.stepped and result.grad_norm == pytest.approx(3.0)  # |x| = 3
    assert torch.allclose(model.weight, -x * 0.5 / 3.0)  # clipped to norm 0.5
    strategy.backward(model(x).sum() * float("inf"))
    strategy.step()
    skipped = strategy.backward(model(x).sum()) or strategy.step()
    assert skipped.skipped and torch.allclose(model.weight, -x * 0.5 / 3.0)  # a non-finite gradient is dropped


def test_resume_with_another_world_size_fails_before_touching_the_model(tmp_path):
    from minillm.checkpoint import save_trainer_state
    from minillm.trainers.common import load_checkpoint

    save_trainer_state(tmp_path, {"step": 3, "world_size": 2}, is_main=True)

    class Strategy(Solo):
        def load_checkpoint(self, directory):
            raise AssertionError("the engine state must not be loaded")

    with pytest.raises(ValueError, match="saved with 2 ranks, resuming with 1"):
        load_checkpoint(tmp_path, Strategy())
