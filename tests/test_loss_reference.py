"""An independent reference for the MiniLLM trainer's loss (DESIGN §4 and §5), written out here in float64 plain torch.

The chunked-vs-plain and DeepSpeed-vs-local tests compare the library with itself: a mistake in the shared
assembly (the wrong advantages, a term dropped, the wrong temperature, a mask applied twice) passes all of them.
This file computes L = L_pg + L_single + ptx_coef · L_PT for fixed micro-batches from the definitions, using
only torch and the models' forward — no helper of the library — and compares it with
``MiniLLMTrainer.micro_batch_loss`` on the plain and the chunked path: the value and the gradient of every student
parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minillm.cli.train import build_trainer
from minillm.config import load_config
from minillm.generation.rollout import Rollout
from minillm.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPERATURE, CLIP, PTX, PT_KD = 0.8, 0.2, 0.7, 0.4


def _trainer(tmp_path, chunked: bool, whiten: str, weighted: bool):
    cfg = load_config("configs/tiny/minillm.yaml", [
        f"output_dir={tmp_path}", f"minillm.chunked_losses={str(chunked).lower()}", f"minillm.whiten={whiten}",
        f"minillm.single_step_weighted={str(weighted).lower()}", f"rollout.temperature={TEMPERATURE}",
        f"minillm.clip_ratio={CLIP}", f"minillm.ptx_coef={PTX}", f"minillm.pt_kd_ratio={PT_KD}",
        "minillm.loss_chunk_size=5", "logging.progress_bar=false"])
    strategy = build_strategy(cfg).setup()
    return build_trainer(cfg, strategy)


def _buffer(trainer, rows: int = 4) -> Rollout:
    """Prompts of different lengths (left-padded), responses of lengths 7, 3, 9 and 1 (EOS last, padding after),
    old log-probs near the student's, importance weights and returns as from an α > 0 rollout."""
    g = torch.Generator().manual_seed(7)
    pad, eos, vocab = trainer.tokenizer.pad_token_id, trainer.tokenizer.eos_token_id, 200
    prompt_lengths, response_lengths, width, length = [5, 9, 3, 7], [7, 3, 9, 1], 9, 9
    prompt_ids = torch.full((rows, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros(rows, width, dtype=torch.long)
    response_ids = torch.full((rows, length), pad, dtype=torch.long)
    response_mask = torch.zeros(rows, length)
    for i, (p, n) in enumerate(zip(prompt_lengths, response_lengths)):
        prompt_ids[i, width - p:] = torch.randint(5, vocab, (p,), generator=g)
        prompt_mask[i, width - p:] = 1
        response_ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        response_ids[i, n - 1] = eos
        response_mask[i, :n] = 1
    noise = lambda: torch.randn(rows, length, generator=g, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        old = _reference_logprobs(trainer.student, prompt_ids, prompt_mask, response_ids).float()
    old = ((old.double() + 0.3 * noise()) * response_mask).float()
    weights = torch.where(response_mask > 0, (0.4 * noise()).exp(), torch.ones(rows, length, dtype=torch.float64))
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, old_logprobs=old, teacher_logprobs=(noise() * response_mask).float(),
                   weights=weights.float(), rewards=(noise() * response_mask).float(),
                   returns=(2.0 * noise() + 0.5).float() * response_mask, prompt_index=torch.arange(rows))


# ------------------------------------------------------------------------------------------ the reference
def _logits(model, prompt_ids, prompt_mask, response_ids):
    """Logits predicting each response token: one forward over [prompt; response], positions from the mask."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    attention = torch.cat([prompt_mask, torch.ones_like(response_ids)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    p = prompt_ids.shape[1]
    return logits[:, p - 1: p - 1 + response_ids.shape[1]].double()


def _reference_logprobs(model, prompt_ids, prompt_mask, response_ids):
    logits = _logits(model, prompt_ids, prompt_mask, response_ids) / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, response_ids[..., None])[..., 0]


def _reference_loss(student, teacher, mb: Rollout, pt_batch, whiten: str, weighted: bool) -> torch.Tensor:
    mask = mb.response_mask.double()
    n = mask.sum()
    # advantages: the micro-batch's returns whitened with the population variance (DESIGN §4 `whiten`)
    returns = mb.returns.double()
    if whiten == "global":  # statistics over every entry, padding included (the reference)
        mu = returns.mean()
        var = ((returns - mu) ** 2).mean()
    else:  # masked: valid tokens only
        mu = (returns * mask).sum() / n
        var = (((returns - mu) ** 2) * mask).sum() / n
    adv = (returns - mu) / torch.sqrt(var + 1e-8)
    # long-range term: PPO clip on ρ = exp((log q_θ − log q_old)·mask)·w, the weight clipped with the ratio
    s_logits = _logits(student, mb.prompt_ids, mb.prompt_mask, mb.response_ids) / TEMPERATURE
    log_q = torch.log_softmax(s_logits, -1)
    lp = log_q.gather(-1, mb.response_ids[..., None])[..., 0] * mask
    rho = torch.exp((lp - mb.old_logprobs.double()) * mask) * mb.weights.double()
    per_token = torch.maximum(-adv * rho, -adv * rho.clamp(1 - CLIP, 1 + CLIP))
    pg = (per_token * mask).sum() / n
    # single-step term: KL(q_θ ‖ p) over the vocabulary at temperature T, token mean (× w with the paper's switch)
    with torch.no_grad():
        log_p = torch.log_softmax(_logits(teacher, mb.prompt_ids, mb.prompt_mask, mb.response_ids) / TEMPERATURE, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    if weighted:
        kl = kl * mb.weights.double()
    single = (kl * mask).sum() / n
    # PT term: (1 − r)·CE + r·(−Σ_v p_v log q_v) on the corpus batch, token means over labels ≠ −100, T = 1
    ids, labels = pt_batch["input_ids"], pt_batch["labels"]
    valid = labels != -100
    log_q_pt = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
    with torch.no_grad():
        p_pt = torch.softmax(teacher(input_ids=ids).logits.double(), -1)
    ce = -log_q_pt.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kd = -(p_pt * log_q_pt).sum(-1)
    pt = (1 - PT_KD) * ce[valid].mean() + PT_KD * kd[valid].mean()
    return pg + single + PTX * pt


# ------------------------------------------------------------------------------------------ the comparison
def _rows(buffer: Rollout, index) -> Rollout:
    return Rollout(**{k: getattr(buffer, k)[index] for k in buffer.__dataclass_fields__})


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("whiten, weighted", [("global", False), ("masked", True)])
def test_micro_batch_loss_equals_the_definition(tmp_path, chunked, whiten, weighted):
    trainer = _trainer(tmp_path, chunked, whiten, weighted)
    student = trainer.strategy.unwrap(trainer.student)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(trainer.teacher).double()
    buffer = _buffer(trainer)
    pt_batches = [next(trainer._batches(trainer.corpus, trainer.pt_sampler, 3, None)) for _ in range(2)]
    # two micro-batches of different response lengths and prompt paddings
    for mb, pt_batch in zip((_rows(buffer, [0, 3]), _rows(buffer, [2, 1])), pt_batches):
        trainer._next_pt_batch = lambda batch=pt_batch: batch
        student.zero_grad(set_to_none=True)
        loss, parts = trainer.micro_batch_loss(mb)
        loss.backward()
        student64.zero_grad(set_to_none=True)
        ref = _reference_loss(student64, teacher64, mb, pt_batch, whiten, weighted)
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=2e-5, abs=1e-6)
        assert parts["loss"] == pytest.approx(ref.item(), rel=2e-5, abs=1e-6)
        for (name, p), p64 in zip(student.named_parameters(), student64.parameters()):
            if p64.grad is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            scale = p64.grad.abs().max().item()
            assert p.grad is not None, name
            assert (p.grad.double() - p64.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_the_reference_sees_a_planted_bug(tmp_path, monkeypatch):
    """The comparison is not vacuous: swapping the advantages' sign in the library's PPO call is caught."""
    from minillm import losses

    trainer = _trainer(tmp_path, False, "global", False)
    real = losses.ppo_clip_loss
    monkeypatch.setattr(losses, "ppo_clip_loss", lambda lp, old, adv, *a, **k: real(lp, old, -adv, *a, **k))
    student = trainer.strategy.unwrap(trainer.student)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(trainer.teacher).double()
    mb = _rows(_buffer(trainer), [0, 3])
    pt_batch = next(trainer._batches(trainer.corpus, trainer.pt_sampler, 3, None))
    trainer._next_pt_batch = lambda: pt_batch
    loss, _ = trainer.micro_batch_loss(mb)
    ref = _reference_loss(student64, teacher64, mb, pt_batch, "global", False)
    assert abs(loss.item() - ref.item()) > 1e-3
