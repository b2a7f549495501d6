"""Behaviours users depend on that the recipes exercise but the tiny tests did not (issue 16 item 4): epoch-based
stopping with the -1 ("once per epoch") evaluation and save intervals every shipped SFT/KD recipe uses, and gradient
checkpointing of the student in each trainer (same loss and gradients as without)."""

from __future__ import annotations

import json

import pytest
import torch

from minillm.cli.train import build_trainer
from minillm.config import load_config
from minillm.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(config: str, tmp_path, *overrides: str):
    cfg = load_config(config, [f"output_dir={tmp_path}", "logging.progress_bar=false", *overrides])
    return build_trainer(cfg, build_strategy(cfg).setup())


def test_epochs_stop_training_and_minus_one_intervals_mean_once_per_epoch(tmp_path):
    trainer = _trainer("configs/tiny/sft.yaml", tmp_path, "data.max_train_records=64", "train.max_steps=-1",
                       "train.epochs=2", "train.eval_interval=-1", "train.save_interval=-1", "eval.rouge=false",
                       "train.select_best_by=loss", "train.keep_checkpoints=-1")
    per_epoch = trainer.steps_per_epoch
    assert per_epoch == 64 // trainer.cfg.train.global_batch_size  # every record once per epoch
    result = trainer.train()
    assert result["step"] == trainer.total_steps == 2 * per_epoch  # stopped by epochs, not by max_steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev/loss" in r] == [per_epoch, 2 * per_epoch]  # evaluated once per epoch
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*"))
    assert saved == [per_epoch, 2 * per_epoch]  # and saved once per epoch
    assert (tmp_path / "final" / "model.safetensors").is_file()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", ["sft", "kd"])
def test_gradient_checkpointing_gives_the_same_sft_and_kd_gradients(tmp_path, config):
    from torch.utils.data import DataLoader

    results = []
    for checkpointing in (False, True):
        trainer = _trainer(f"configs/tiny/{config}.yaml", tmp_path / str(checkpointing),
                           f"student.gradient_checkpointing={str(checkpointing).lower()}")
        student = trainer.strategy.unwrap(trainer.student)
        assert bool(getattr(student, "is_gradient_checkpointing", False)) == checkpointing
        batch = next(iter(DataLoader(trainer.data.train, batch_size=4, collate_fn=trainer.data.sft_collator)))
        student.zero_grad(set_to_none=True)
        loss, _ = trainer.compute_loss(batch)
        loss.backward()
        results.append((loss.item(), _grads(student)))
    (plain_loss, plain), (gc_loss, gc) = results
    assert gc_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == gc.keys() and plain
    for name in plain:
        torch.testing.assert_close(gc[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_minillm_gradients(tmp_path):
    results = []
    buffer = None
    for checkpointing in (False, True):
        trainer = _trainer("configs/tiny/minillm.yaml", tmp_path / str(checkpointing),
                           f"student.gradient_checkpointing={str(checkpointing).lower()}")
        student = trainer.strategy.unwrap(trainer.student)
        assert bool(getattr(student, "is_gradient_checkpointing", False)) == checkpointing
        if buffer is None:
            buffer = trainer.rollout_and_score()
        mb = type(buffer)(**{k: getattr(buffer, k)[:8] for k in buffer.__dataclass_fields__})
        pt = next(trainer._batches(trainer.corpus, trainer.pt_sampler, 8, None))
        trainer._next_pt_batch = lambda batch=pt: batch
        student.zero_grad(set_to_none=True)
        loss, _ = trainer.micro_batch_loss(mb)
        loss.backward()
        results.append((loss.item(), _grads(student)))
    (plain_loss, plain), (gc_loss, gc) = results
    assert gc_loss == pytest.approx(plain_loss, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(gc[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_an_fp16_teacher_on_cpu_gives_the_fp32_kd_loss_within_half_precision(tmp_path):
    """The shipped recipes load the teacher in fp16; on a CPU that must compute, and agree with an fp32 teacher
    to within fp16 rounding (the loss, its KD part and the student's gradients)."""
    from torch.utils.data import DataLoader

    results = {}
    for dtype in ("fp32", "fp16"):
        trainer = _trainer("configs/tiny/kd.yaml", tmp_path / dtype, f"teacher.dtype={dtype}")
        assert next(trainer.teacher.parameters()).dtype == (torch.float16 if dtype == "fp16" else torch.float32)
        student = trainer.strategy.unwrap(trainer.student)
        batch = next(iter(DataLoader(trainer.data.train, batch_size=4, collate_fn=trainer.data.sft_collator)))
        student.zero_grad(set_to_none=True)
        loss, parts = trainer.compute_loss(batch)
        loss.backward()
        results[dtype] = (parts, _grads(student))
    (p32, g32), (p16, g16) = results["fp32"], results["fp16"]
    assert p16["kd"] == pytest.approx(p32["kd"], rel=2e-3) and p16["ce"] == p32["ce"]
    for name, g in g32.items():
        assert (g16[name] - g).abs().max() <= 2e-3 * g.abs().max() + 1e-7, name
