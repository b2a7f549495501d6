"""The teacher's temperature inside the reward (issue 15 item 3): ``minillm.reward_teacher_temperature``.

rollout (default): r_t = (log p_T(y_t) − log q_T(y_t)) / scale, both at rollout.temperature; one (the official
code's reward_fn): the teacher's log-prob at T = 1, the student's at T. Weights and stored teacher log-probs stay at
T in both. Checked against log-softmax values computed here, at T = 0.6, on the plain and the chunked path."""

from __future__ import annotations

import pytest
import torch

from minillm.models import tiny_llama
from minillm.generation.rollout import score_samples

T, SCALE, ALPHA = 0.6, 0.5, 0.2


def _logprobs(model, ids, mask, response, temperature):
    full = torch.cat([ids, response], 1)
    attention = torch.cat([mask, torch.ones_like(response)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attention, position_ids=positions).logits.double()
    logits = logits[:, ids.shape[1] - 1: ids.shape[1] - 1 + response.shape[1]] / temperature
    return torch.log_softmax(logits, -1).gather(-1, response[..., None])[..., 0]


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["plain", "chunked"])
@pytest.mark.parametrize("mode", ["rollout", "one"])
def test_reward_uses_the_configured_teacher_temperature(chunk_size, mode):
    student, teacher = tiny_llama(seed=1).eval(), tiny_llama(hidden_size=48, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    response = torch.randint(3, 256, (3, 6), generator=g)
    response_mask = torch.ones(3, 6)
    response_mask[1, 4:] = 0
    out = score_samples(student=student, teacher=teacher, prompt_ids=ids, prompt_mask=mask, response_ids=response,
                        response_mask=response_mask, prompt_index=torch.arange(3), alpha=ALPHA, temperature=T,
                        reward_scale=SCALE, reward_clip=100.0, gamma=0.95, length_norm=True, include_current=True,
                        chunk_size=chunk_size, num_chunks=None,
                        reward_teacher_temperature=1.0 if mode == "one" else None)
    q = _logprobs(student, ids, mask, response, T) * response_mask
    p_t = _logprobs(teacher, ids, mask, response, T) * response_mask
    p_reward = _logprobs(teacher, ids, mask, response, 1.0 if mode == "one" else T) * response_mask
    torch.testing.assert_close(out.old_logprobs.double(), q, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.teacher_logprobs.double(), p_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rewards.double(), (p_reward - q) / SCALE, atol=2e-5, rtol=0)
    w = q.exp() / ((1 - ALPHA) * q.exp() + ALPHA * p_t.exp())
    torch.testing.assert_close(out.weights.double(), torch.where(response_mask > 0, w, torch.ones_like(w)),
                               atol=1e-5, rtol=0)
    if mode == "one":  # the two modes really differ at T != 1
        assert (p_reward - p_t).abs().max() > 1e-2


@pytest.mark.parametrize("gamma, length_norm", [(0.95, True), (0.8, False)])
def test_returns_discount_and_length_normalise_the_scored_rewards(gamma, length_norm):
    """score_samples' returns against DESIGN §4 written out: R_t = Σ_{t'≥t} γ^{t'−t} r_{t'} over valid tokens,
    divided by the number of valid tokens summed with length_norm."""
    student, teacher = tiny_llama(seed=1).eval(), tiny_llama(hidden_size=48, seed=2).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(3, 256, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.long)
    response = torch.randint(3, 256, (2, 5), generator=g)
    response_mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = score_samples(student=student, teacher=teacher, prompt_ids=ids, prompt_mask=mask, response_ids=response,
                        response_mask=response_mask, prompt_index=torch.arange(2), alpha=0.2, temperature=1.0,
                        reward_scale=SCALE, reward_clip=100.0, gamma=gamma, length_norm=length_norm,
                        include_current=True)
    r = out.rewards.double()
    for row in range(2):
        n = int(response_mask[row].sum())
        for t in range(5):
            if t >= n:
                assert out.returns[row, t].item() == 0.0
                continue
            total = sum(gamma ** (u - t) * r[row, u].item() for u in range(t, n))
            expected = total / (n - t) if length_norm else total
            assert out.returns[row, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (row, t)
