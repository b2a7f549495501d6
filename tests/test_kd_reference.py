"""An independent reference for the SFT/KD trainer's loss, in float64 plain torch: (1 − r)·CE + r·KD with the KD
term at temperature T, token means over the response positions (DESIGN §4 `pt_loss` / `divergence`), against
``SFTTrainer.compute_loss`` on the plain and the chunked path: value and every student parameter's gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from minillm.cli.train import build_trainer
from minillm.config import load_config
from minillm.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO, T = 0.3, 2.0


def _reference(student, teacher, batch, divergence: str) -> torch.Tensor:
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    valid = labels != -100
    log_q = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits.double(), -1)
    ce = -log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0][valid].mean()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits.double()
    log_q_t = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits.double() / T, -1)
    log_p_t = torch.log_softmax(t_logits / T, -1)
    if divergence == "fkl":  # the reference KD term: teacher cross-entropy −Σ_v p_v log q_v
        kd = -(log_p_t.exp() * log_q_t).sum(-1)
    else:  # rkl: KL(q ‖ p)
        kd = (log_q_t.exp() * (log_q_t - log_p_t)).sum(-1)
    return (1 - RATIO) * ce + RATIO * kd[valid].mean()


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_kd_loss_equals_the_definition(tmp_path, chunked, divergence):
    cfg = load_config("configs/tiny/kd.yaml", [f"output_dir={tmp_path}", f"kd.kd_ratio={RATIO}",
                                               f"kd.temperature={T}", f"kd.divergence={divergence}",
                                               f"kd.chunked={str(chunked).lower()}", "kd.chunk_size=7"])
    trainer = build_trainer(cfg, build_strategy(cfg).setup())
    student = trainer.strategy.unwrap(trainer.student)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(trainer.teacher).double()
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(trainer.data.train, batch_size=4, collate_fn=trainer.data.sft_collator)))
    student.zero_grad(set_to_none=True)
    loss, parts = trainer.compute_loss(batch)
    loss.backward()
    ref = _reference(student64, teacher64, batch, divergence)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-5)
    assert parts["loss"] == pytest.approx(ref.item(), rel=2e-5)
    for (name, p), p64 in zip(student.named_parameters(), student64.parameters()):
        scale = p64.grad.abs().max().item()
        assert (p.grad.double() - p64.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_kd_ptx_coef_adds_the_corpus_lm_loss(tmp_path, chunked):
    """kd.ptx_coef (DistiLLM's --lm-coef): the KD loss + coef × the student's cross-entropy on a pre-training batch
    (every position scored), against the definition in float64."""
    cfg = load_config("configs/tiny/kd.yaml", [f"output_dir={tmp_path}", f"kd.kd_ratio={RATIO}", f"kd.temperature={T}",
                                               f"kd.chunked={str(chunked).lower()}", "kd.chunk_size=7",
                                               "kd.ptx_coef=0.5", "data.pretrain=tests/assets/data/pretrain.txt",
                                               "data.pretrain_seq_length=32"])
    trainer = build_trainer(cfg, build_strategy(cfg).setup())
    student = trainer.strategy.unwrap(trainer.student)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(trainer.teacher).double()
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(trainer.data.train, batch_size=4, collate_fn=trainer.data.sft_collator)))
    pt_batch = next(iter(DataLoader(trainer.corpus, batch_size=3)))
    trainer._next_pt_batch = lambda: pt_batch
    loss, parts = trainer.compute_loss(batch)
    loss.backward()
    log_q = torch.log_softmax(student64(input_ids=pt_batch["input_ids"]).logits.double(), -1)
    pt_ce = -log_q.gather(-1, pt_batch["labels"][..., None])[..., 0].mean()
    ref = _reference(student64, teacher64, batch, "fkl") + 0.5 * pt_ce
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-5)
    assert parts["pt_loss"] == pytest.approx(pt_ce.item(), rel=2e-5) and parts["loss"] == pytest.approx(ref.item(), rel=2e-5)
    for (name, p), p64 in zip(student.named_parameters(), student64.parameters()):
        assert (p.grad.double() - p64.grad).abs().max().item() <= 1e-4 * p64.grad.abs().max().item() + 1e-7, name


def test_kd_ptx_coef_needs_a_corpus():
    from minillm.config import ConfigError

    with pytest.raises(ConfigError, match="kd.ptx_coef.*data.pretrain"):
        load_config("configs/tiny/kd.yaml", ["kd.ptx_coef=1.0"])
