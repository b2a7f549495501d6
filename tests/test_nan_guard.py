"""Training survives non-finite losses and gradients: skip and count, abort past train.max_nan_skips.

The trainer is built in-process from the tiny SFT recipe; ``compute_loss`` is wrapped so that chosen
micro-batches return NaN (a bad loss) or a finite loss whose gradient is infinite (a bad gradient).
"""

import json
import math
import os

import pytest

import torch

from minillm.config import load_config
from minillm.strategy import build_strategy
from minillm.trainers.common import NonFiniteLossError

from conftest import REPO


def make_trainer(tmp_path, *overrides):
    from minillm.cli.train import build_trainer

    os.chdir(REPO)  # the recipe's asset paths are relative to the repository
    cfg = load_config("configs/tiny/sft.yaml", [f"output_dir={tmp_path}", "train.max_steps=4",
                                                "train.eval_interval=0", "train.save_interval=0",
                                                "logging.log_interval=1", *overrides], world_size=1)
    return build_trainer(cfg, build_strategy(cfg).setup())


def poison(trainer, bad_calls, kind):
    """Wrap compute_loss: on the given (0-based) micro-batch calls return a NaN loss or an infinite gradient."""
    original, calls = trainer.compute_loss, {"n": 0}

    def compute_loss(batch):
        loss, parts = original(batch)
        n = calls["n"]
        calls["n"] += 1
        if n in bad_calls:
            if kind == "loss":
                loss = loss * float("nan")
            else:  # finite value, infinite gradient: d/dx of x·1e38·1e38 overflows in fp32
                loss = loss + (loss - loss.detach()) * torch.tensor(1e38) * torch.tensor(1e38)
        return loss, parts

    trainer.compute_loss = compute_loss


def read_rows(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_is_skipped_counted_and_training_finishes(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_nan_skips=3")
    poison(trainer, {1, 4}, "loss")  # accumulation 2: the second micro-batch of steps 1 and 3
    result = trainer.train()
    assert result["step"] == 4 and result["nan_skips"] == 2
    rows = [r for r in read_rows(tmp_path) if "train/loss" in r]
    assert [r["train/nan_skips"] for r in rows] == [1, 1, 2, 2]
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    # the skipped NaN never reaches the logged mean: a real float each time (non-finite values are logged as the
    # strings "nan"/"inf", which an `x == x` check would let through)
    assert all(isinstance(r["train/loss"], float) and math.isfinite(r["train/loss"]) for r in rows), rows


def test_infinite_gradient_skips_the_optimizer_step(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_nan_skips=3", "train.max_steps=1")
    before = [p.detach().clone() for p in trainer.student.parameters()]
    poison(trainer, {0}, "gradient")
    result = trainer.train()
    assert result["nan_skips"] == 1
    # the only step had an infinite gradient norm: the weights did not move and stayed finite
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    row = [r for r in read_rows(tmp_path) if "train/loss" in r][0]
    assert row["train/grad_norm"] in ("inf", "nan")  # non-finite values are logged as strings (valid JSON)


def test_too_many_non_finite_losses_abort_with_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_nan_skips=1")
    poison(trainer, {0, 1}, "loss")
    with pytest.raises(NonFiniteLossError, match="max_nan_skips=1"):
        trainer.train()
