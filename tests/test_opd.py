"""On-policy distillation (minillm.objective: opd) in the MiniLLM trainer.

The per-token form used by verl, NeMo-RL, TRL, Tinker and others: the student samples and each sampled token's
advantage is A_t = log p(y_t) − log q_old(y_t), optionally discounted (γ) and length-normalised, in the PPO-clipped
policy gradient, with no reward scale, reward clip or whitening. Checked against the definition written out here in
float64, against the MiniLLM objective with the switches that make the two coincide, and end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minillm.cli.train import build_trainer
from minillm.config import load_config
from minillm.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["rollout.num_rollouts=16", "train.micro_batch_size=8", "train.global_batch_size=8", "rollout.chunk_size=16"]


def _trainer(tmp_path, *overrides: str):
    cfg = load_config("configs/tiny/opd.yaml", [f"output_dir={tmp_path}", *SMALL, *overrides])
    return build_trainer(cfg, build_strategy(cfg).setup())


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_advantages_are_the_per_token_log_ratio(tmp_path, gamma):
    trainer = _trainer(tmp_path, f"minillm.opd_gamma={gamma}")
    buf = trainer.rollout_and_score()
    mask = buf.response_mask.double()
    ratio = (buf.teacher_logprobs.double() - buf.old_logprobs.double()) * mask
    assert (mask.sum(1) > 1).all()  # several tokens per row, so the discount matters
    expected = torch.zeros_like(ratio)
    for t in reversed(range(ratio.shape[1])):  # A_t = r_t + γ A_{t+1} over valid tokens (unnormalised)
        later = expected[:, t + 1] if t + 1 < ratio.shape[1] else torch.zeros_like(ratio[:, 0])
        expected[:, t] = (ratio[:, t] + gamma * later) * mask[:, t]
    torch.testing.assert_close(buf.returns.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf.rewards.double(), ratio, atol=1e-6, rtol=0)  # no scale, no clip


def _reference_pg(student64, mb, clip: float | None) -> torch.Tensor:
    """Token mean of max(−A ρ, −A clip(ρ)) with ρ = exp(log q_θ − log q_old), A = the stored advantages as they are."""
    ids = torch.cat([mb.prompt_ids, mb.response_ids], 1)
    attention = torch.cat([mb.prompt_mask, torch.ones_like(mb.response_ids)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    p = mb.prompt_ids.shape[1]
    logits = student64(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double()
    log_q = torch.log_softmax(logits[:, p - 1: p - 1 + mb.response_ids.shape[1]], -1)
    mask = mb.response_mask.double()
    lp = log_q.gather(-1, mb.response_ids[..., None])[..., 0] * mask
    rho = torch.exp((lp - mb.old_logprobs.double()) * mask) * mb.weights.double()
    adv = mb.returns.double()
    per = -adv * rho if clip is None else torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip, 1 + clip))
    return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
@pytest.mark.parametrize("clip", [True, False])
def test_opd_loss_equals_the_definition(tmp_path, chunked, clip):
    trainer = _trainer(tmp_path, f"minillm.chunked_losses={str(chunked).lower()}",
                       f"minillm.opd_clip={str(clip).lower()}", "minillm.clip_ratio=0.05")
    buf = trainer.rollout_and_score()
    mb = type(buf)(**{k: getattr(buf, k)[:8] for k in buf.__dataclass_fields__})
    # perturb the old log-probs so the ratio is far from 1 and clipping acts
    g = torch.Generator().manual_seed(0)
    mb.old_logprobs = (mb.old_logprobs + 0.3 * torch.randn(mb.old_logprobs.shape, generator=g)) * mb.response_mask
    student = trainer.strategy.unwrap(trainer.student)
    student64 = copy.deepcopy(student).double()
    loss, parts = trainer.micro_batch_loss(mb)
    loss.backward()
    ref = _reference_pg(student64, mb, 0.05 if clip else None)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert (parts["clip_fraction"] > 0) == clip
    for (name, p), p64 in zip(student.named_parameters(), student64.parameters()):
        assert (p.grad.double() - p64.grad).abs().max().item() <= 1e-4 * p64.grad.abs().max().item() + 1e-8, name


def test_opd_equals_minillm_with_the_coinciding_switches(tmp_path):
    """MiniLLM with reward scale 1, no reward clip, γ = 0, no length normalisation and no whitening is OPD: the same
    buffer (same seeds) and the same loss, value for value."""
    opd = _trainer(tmp_path / "opd", "minillm.single_step=true", "minillm.ptx_coef=0")
    pg = load_config("configs/tiny/opd.yaml", [f"output_dir={tmp_path / 'pg'}", *SMALL, "minillm.objective=pg",
                                               "minillm.single_step=true", "minillm.ptx_coef=0",
                                               "minillm.reward_scale=1", "minillm.reward_clip=1e30",
                                               "minillm.gamma=0", "minillm.length_norm=false", "minillm.whiten=none"])
    pg = build_trainer(pg, build_strategy(pg).setup())
    a, b = opd.rollout_and_score(), pg.rollout_and_score()
    for field in ("response_ids", "old_logprobs", "teacher_logprobs", "weights", "rewards", "returns"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0, msg=field)
    mb = type(a)(**{k: getattr(a, k)[:8] for k in a.__dataclass_fields__})
    loss_opd, parts_opd = opd.micro_batch_loss(mb)
    loss_pg, parts_pg = pg.micro_batch_loss(mb)
    assert loss_opd.item() == loss_pg.item() and parts_opd["single_step_kl"] == parts_pg["single_step_kl"]


def test_the_tiny_opd_recipe_raises_the_teachers_likelihood_of_student_samples(tmp_path):
    cfg = load_config("configs/tiny/opd.yaml", [f"output_dir={tmp_path}", "eval.num_prompts=48", "eval.rouge=false",
                                                "train.select_best_by=none"])
    trainer = build_trainer(cfg, build_strategy(cfg).setup())
    before = trainer.evaluate()["dev/teacher_logprob"]
    for _ in range(8):
        trainer.run_phase()
    after = trainer.evaluate()["dev/teacher_logprob"]
    assert after > before + 0.6, (before, after)  # measured: −11.18 → −9.80 nats/token


def test_opd_config_checks():
    from minillm.config import ConfigError

    with pytest.raises(ConfigError, match="opd_gamma"):
        load_config("configs/tiny/opd.yaml", ["minillm.opd_gamma=1.5"])
    with pytest.raises(ConfigError, match="opd objective has no term left"):
        load_config("configs/tiny/opd.yaml", ["minillm.long_range=false", "minillm.single_step=false"])
