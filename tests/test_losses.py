"""minillm.losses against hand-computed values, invariants, and chunked = plain.

Hand values use distributions whose logs are exact: logits = log(probs), so softmax(logits) = probs.
Expected numbers are written out (or built from math.log on those probabilities), never from the function
under test.
"""

import math

import pytest
import torch

from minillm.losses import chunked as CL
from minillm import losses as L

LN2 = math.log(2.0)
Q = [0.25, 0.25, 0.5]  # a student distribution over 3 tokens
P = [0.125, 0.375, 0.5]  # a teacher distribution over 3 tokens


def logits_of(*rows, dtype=torch.float64):
    """[1, len(rows), V] logits whose softmax rows are exactly the given probability rows."""
    return torch.tensor(rows, dtype=dtype).log().unsqueeze(0)


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------------ basics
def test_token_logprobs_hand_values_and_temperature():
    logits = logits_of(Q, P)
    tokens = torch.tensor([[2, 1]])
    out = L.token_logprobs(logits, tokens)
    assert torch.allclose(out, torch.tensor([[math.log(0.5), math.log(0.375)]], dtype=torch.float64))
    # logits [0, 0, 2 ln 2] at T = 2 are [0, 0, ln 2]: softmax [1/4, 1/4, 1/2]
    hot = torch.tensor([[[0.0, 0.0, 2 * LN2]]])
    assert torch.allclose(L.token_logprobs(hot, torch.tensor([[0]]), temperature=2.0), torch.tensor([[-2 * LN2]]))


def test_token_logprobs_upcasts_half_precision_and_keeps_fp64():
    logits = torch.randn(2, 3, 7)
    out = L.token_logprobs(logits.bfloat16(), torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    assert L.token_logprobs(logits.double(), torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float64
    with pytest.raises(ValueError, match="tokens"):
        L.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))


def test_response_mask_includes_first_eos_only():
    response = torch.tensor([[5, 2, 7, 2], [1, 1, 1, 1], [2, 3, 3, 3], [4, 4, 4, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(L.response_mask(response, 2), expected)
    # several stop ids: the 7 at position 1 ends the first row
    multi = L.response_mask(torch.tensor([[5, 7, 2, 2], [3, 3, 3, 3]]), [2, 7])
    assert torch.equal(multi, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32))


def test_mix_probs_hand_values():
    out = L.mix_probs(logits_of(Q), logits_of(P), alpha=0.2)
    expected = [0.8 * 0.25 + 0.2 * 0.125, 0.8 * 0.25 + 0.2 * 0.375, 0.5]  # [0.225, 0.275, 0.5]
    assert torch.allclose(out, torch.tensor([[expected]], dtype=torch.float64))
    assert torch.allclose(out.sum(-1), torch.ones(1, 1, dtype=torch.float64))


def test_importance_weights_hand_values_alpha_zero_and_mask():
    lq = torch.tensor([[math.log(0.5), math.log(0.5), -3.0]])
    lp = torch.tensor([[math.log(0.25), math.log(0.25), 5.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    w = L.importance_weights(lq, lp, mask, alpha=0.2)
    # q / (0.8 q + 0.2 p) = 0.5 / (0.4 + 0.05) = 10/9; masked -> 1; third: 1/(0.8 + 0.2 e^8)
    assert torch.allclose(w, torch.tensor([[10 / 9, 1.0, 1 / (0.8 + 0.2 * math.exp(8.0))]]))
    assert torch.equal(L.importance_weights(lq, lp, mask, alpha=0.0), torch.ones(1, 3))
    # extreme log-ratios stay finite (the probability-space formula would give 0/0)
    extreme = L.importance_weights(torch.tensor([[-200.0]]), torch.tensor([[-300.0]]), torch.ones(1, 1), 0.2)
    assert torch.allclose(extreme, torch.tensor([[1.25]]))


def test_token_rewards_scale_clip_and_mask():
    lp = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.5)]])
    lq = torch.tensor([[math.log(0.5), math.log(0.5), math.log(0.25)]])
    mask = torch.tensor([[1, 0, 1]])
    r = L.token_rewards(lp, lq, mask)  # scale 0.5: 2·(log p − log q)
    assert torch.allclose(r, torch.tensor([[-2 * LN2, 0.0, 2 * LN2]]))
    r = L.token_rewards(lp, lq, mask, scale=0.5, clip=1.0)
    assert torch.allclose(r, torch.tensor([[-1.0, 0.0, 1.0]]))
    r = L.token_rewards(lp, lq, mask, scale=1.0, clip=None)
    assert torch.allclose(r, torch.tensor([[-LN2, 0.0, LN2]]))


# the 1×4 example: three valid tokens, EOS at t = 2, a stray reward of 100 at the masked position 3
REWARDS = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
EOS_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("gamma, include_current, length_norm, expected", [
    # γ = 0.5: R_0 = 1 + 0.5·2 + 0.25·3 = 2.75, R_1 = 2 + 0.5·3 = 3.5, R_2 = 3
    (0.5, True, False, [2.75, 3.5, 3.0, 0.0]),
    (0.5, True, True, [2.75 / 3, 3.5 / 2, 3.0, 0.0]),  # counts 3, 2, 1, 0
    (0.5, False, False, [3.5, 3.0, 0.0, 0.0]),  # R_{t+1}
    (0.5, False, True, [3.5 / 2, 3.0, 0.0, 0.0]),  # counts 2, 1, 0, 0
    (1.0, True, False, [6.0, 5.0, 3.0, 0.0]),
    (1.0, True, True, [2.0, 2.5, 3.0, 0.0]),
    (1.0, False, False, [5.0, 3.0, 0.0, 0.0]),
    (1.0, False, True, [2.5, 3.0, 0.0, 0.0]),
    (0.0, True, False, [1.0, 2.0, 3.0, 0.0]),
    (0.0, False, False, [2.0, 3.0, 0.0, 0.0]),
])
def test_long_range_advantages_hand_values(gamma, include_current, length_norm, expected):
    out = L.long_range_advantages(REWARDS, EOS_MASK, gamma=gamma, length_norm=length_norm,
                                  include_current=include_current)
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6), out


def test_long_range_advantages_reference_default_is_discounted_including_current():
    out = L.long_range_advantages(REWARDS, EOS_MASK)  # γ = 0.95, length_norm, include_current
    r0 = 1 + 0.95 * 2 + 0.95 ** 2 * 3
    assert torch.allclose(out, torch.tensor([[r0 / 3, (2 + 0.95 * 3) / 2, 3.0, 0.0]]))


def test_whiten_hand_values_masked_and_unmasked():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # μ = 2.5, population σ² = (2.25 + 0.25 + 0.25 + 2.25)/4 = 1.25
    assert torch.allclose(L.whiten(x), (x - 2.5) / math.sqrt(1.25 + 1e-8))
    y = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    out = L.whiten(y, torch.tensor([[1, 1, 1, 0]]))  # μ = 2, σ² = 2/3 over the valid three
    assert torch.allclose(out[:, :3], torch.tensor([[-1.0, 0.0, 1.0]]) / math.sqrt(2 / 3 + 1e-8))
    # the reference (mask=None) statistics include padding entries
    padded = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    assert torch.allclose(L.whiten(padded), (padded - 1.5) / math.sqrt(2.75 + 1e-8))
    # nothing valid: zeros, not NaN
    assert torch.equal(L.whiten(x, torch.zeros(1, 4)), torch.zeros(1, 4))


@pytest.mark.parametrize("use_mask", [False, True])
def test_whiten_two_simulated_ranks_equal_whiten_of_the_whole(use_mask):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.4).float()
    halves = [(full[:3], mask[:3]), (full[3:], mask[3:])]

    def local_stats(values, m):  # what this rank would hand to the all-reduce
        seen = []
        L.whiten(values, m if use_mask else None, all_reduce=lambda t: seen.append(t.clone()) or t)
        assert len(seen) == 1
        return seen[0]

    stats = [local_stats(v, m) for v, m in halves]
    parts = [L.whiten(v, m if use_mask else None, all_reduce=lambda t, other=stats[1 - i]: t + other)
             for i, (v, m) in enumerate(halves)]
    expected = L.whiten(full, mask if use_mask else None)
    assert torch.allclose(torch.cat(parts), expected, atol=1e-6)
    # and not trivially: local statistics alone differ
    assert not torch.allclose(L.whiten(full[:3], mask[:3] if use_mask else None), expected[:3], atol=1e-3)


def test_masked_mean_and_k3():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert L.masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert L.masked_mean(x, torch.zeros(2, 3)).item() == 0.0
    # fractional mask: Σ x m / Σ m
    assert L.masked_mean(torch.tensor([2.0, 4.0]), torch.tensor([0.5, 1.5])).item() == pytest.approx(3.5)
    lq = torch.tensor([[math.log(0.25), math.log(0.5)], [0.0, 0.0]])
    lp = torch.tensor([[math.log(0.5), math.log(0.5)], [-1.0, -1.0]])
    k3 = L.k3_reverse_kl(lq, lp, torch.tensor([[1, 1], [0, 0]]))
    # d = ln 2 → e^d − 1 − d = 1 − ln 2; d = 0 → 0; mean over 2 tokens; empty row → 0
    assert torch.allclose(k3, torch.tensor([(1 - LN2) / 2, 0.0]))


# ------------------------------------------------------------------------------------------------ losses
def test_ppo_clip_loss_clipping_positive_and_negative_advantages():
    ratios = [0.5, 1.1, 1.5]
    old = torch.zeros(2, 3, dtype=torch.float64)
    logprobs = torch.tensor([ratios, ratios], dtype=torch.float64).log().requires_grad_(True)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    mask = torch.ones(2, 3)
    loss = L.ppo_clip_loss(logprobs, old, adv, mask, clip_ratio=0.2)
    # A=+1: max(−ρ, −clip ρ) = −0.5, −1.1, −1.2 (clipped); A=−1: max(ρ, clip ρ) = 0.8 (clipped), 1.1, 1.5
    per_token = [-0.5, -1.1, -1.2, 0.8, 1.1, 1.5]
    assert loss.item() == pytest.approx(sum(per_token) / 6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    # d(−Aρ)/d log q = −Aρ where unclipped, 0 where the clipped branch is active
    expected = torch.tensor([[-0.5, -1.1, 0.0], [0.0, 1.1, 1.5]], dtype=torch.float64) / 6
    assert torch.allclose(grad, expected)


def test_ppo_clip_loss_weights_clipped_with_ratio_and_masking():
    zero = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    weights = torch.tensor([[1.5, 0.9, 1.0]])
    loss = L.ppo_clip_loss(zero, zero, adv, mask, weights=weights, clip_ratio=0.2)
    # ρ·w = 1.5 → clipped to 1.2 → −1.2; 0.9 → −0.9; third masked
    assert loss.item() == pytest.approx((-1.2 - 0.9) / 2)
    no_clip = L.ppo_clip_loss(zero, zero, adv, mask, weights=weights, clip_ratio=None)
    assert no_clip.item() == pytest.approx((-1.5 - 0.9) / 2)
    # −inf log-probs at masked positions do not leak
    lp = torch.tensor([[0.0, 0.0, -float("inf")]])
    assert torch.isfinite(L.ppo_clip_loss(lp, zero, adv, mask))


def test_single_step_kl_hand_value_gradient_and_weights():
    s = logits_of(Q, Q).requires_grad_(True)
    t = logits_of(P, Q)
    mask = torch.ones(1, 2)
    loss = L.single_step_kl(s, t, mask)
    kl0 = kl(Q, P)  # 1/4 ln 2 + 1/4 ln(2/3) + 0
    assert loss.item() == pytest.approx(kl0 / 2)
    assert kl0 == pytest.approx(0.25 * LN2 + 0.25 * math.log(2 / 3))
    (grad,) = torch.autograd.grad(loss, s)
    # ∂KL/∂s_j = q_j[(log q_j − log p_j) − KL], divided by the 2 tokens of the mean
    row0 = [q * (math.log(q / p) - kl0) / 2 for q, p in zip(Q, P)]
    assert torch.allclose(grad, torch.tensor([[row0, [0.0] * 3]], dtype=torch.float64))
    weighted = L.single_step_kl(s, t, mask, weights=torch.tensor([[3.0, 7.0]]))
    assert weighted.item() == pytest.approx(3 * kl0 / 2)
    # temperature divides both logits: logits·T at temperature T give the same KL
    hot = L.single_step_kl(s * 2.0, t * 2.0, mask, temperature=2.0)
    assert hot.item() == pytest.approx(kl0 / 2)


def test_pt_loss_hand_values():
    s = logits_of(Q, Q, Q)
    t = logits_of(P, P, P)
    labels = torch.tensor([[2, 0, -100]])
    ce = (LN2 + 2 * LN2) / 2  # −ln(1/2), −ln(1/4)
    kd = -sum(p * math.log(q) for p, q in zip(P, Q))  # −Σ p log q per position
    assert L.pt_loss(s, labels).item() == pytest.approx(ce)
    assert L.pt_loss(s, labels, t, kd_ratio=0.5).item() == pytest.approx(0.5 * ce + 0.5 * kd)
    assert L.pt_loss(s, labels, t, kd_ratio=1.0).item() == pytest.approx(kd)
    assert L.pt_loss(s, labels, t, kd_ratio=0.0).item() == pytest.approx(ce)
    assert kd == pytest.approx(0.125 * 2 * LN2 + 0.375 * 2 * LN2 + 0.5 * LN2)


@pytest.mark.parametrize("kind, expected", [
    ("fkl", kl(P, Q)),
    ("rkl", kl(Q, P)),
    ("jsd", 0.5 * kl(P, mix(P, Q, 0.5)) + 0.5 * kl(Q, mix(P, Q, 0.5))),
    ("tvd", 0.5 * (0.125 + 0.125 + 0.0)),
    ("sfkl", kl(P, mix(P, Q, 0.1))),
    ("srkl", kl(Q, mix(Q, P, 0.1))),
])
def test_divergence_hand_values(kind, expected):
    s, t = logits_of(Q, Q), logits_of(P, P)
    out = L.divergence(s, t, torch.tensor([[1, 0]]), kind)
    assert out.item() == pytest.approx(expected, rel=1e-10)


def test_divergence_hand_values_written_out():
    # the formula helpers above, checked once against numbers worked by hand
    assert kl(P, Q) == pytest.approx(0.125 * math.log(0.5) + 0.375 * math.log(1.5))
    assert kl(Q, P) == pytest.approx(0.25 * LN2 + 0.25 * math.log(2 / 3))
    assert mix(P, Q, 0.5) == [0.1875, 0.3125, 0.5]


# ------------------------------------------------------------------------------------------------ invariants
def test_teacher_equals_student_gives_zero():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 4)
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    for kind in L.DIVERGENCES:
        assert L.divergence(logits, logits, mask, kind).item() == pytest.approx(0.0, abs=1e-12), kind
    assert L.single_step_kl(logits, logits, mask).item() == pytest.approx(0.0, abs=1e-12)
    lp = L.token_logprobs(logits, tokens)
    assert torch.equal(L.token_rewards(lp, lp, mask), torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(L.k3_reverse_kl(lp, lp, mask), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(L.importance_weights(lp, lp, mask, 0.2), torch.ones(2, 4, dtype=torch.float64))


def test_fully_masked_gives_exact_zero_and_finite_gradients():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5)
    none = torch.zeros(2, 3)
    zero = torch.zeros(2, 3)
    results = [L.single_step_kl(logits, t, none), L.pt_loss(logits, torch.full((2, 3), -100)),
               L.pt_loss(logits, torch.full((2, 3), -100), t),
               L.ppo_clip_loss(L.token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long)), zero, zero + 1, none)]
    results += [L.divergence(logits, t, none, kind) for kind in L.DIVERGENCES]
    for value in results:
        assert value.item() == 0.0
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(L.long_range_advantages(torch.ones(2, 3), none), zero)


def test_divergence_endpoints_and_tvd_bounds():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(3, 4)
    fkl, rkl = L.divergence(s, t, mask, "fkl").item(), L.divergence(s, t, mask, "rkl").item()
    # β = 0 and 1 are the limits of the normalised JSD (GKD/TRL): forward and reverse KL, not the identically-zero
    # unnormalised value (a run would train nothing)
    assert L.divergence(s, t, mask, "jsd", beta=0.0).item() == pytest.approx(fkl, rel=1e-12)
    assert L.divergence(s, t, mask, "jsd", beta=1.0).item() == pytest.approx(rkl, rel=1e-12)
    # ... and the ends are continuous with the interior: JSD_β/β → KL(p‖q), JSD_β/(1−β) → KL(q‖p)
    eps = 1e-6
    assert L.divergence(s, t, mask, "jsd", beta=eps).item() / eps == pytest.approx(fkl, rel=1e-4)
    assert L.divergence(s, t, mask, "jsd", beta=1 - eps).item() / eps == pytest.approx(rkl, rel=1e-4)
    assert L.divergence(s, t, mask, "jsd").item() > 1e-3
    assert L.divergence(s, t, mask, "sfkl", skew=0.0).item() == pytest.approx(
        L.divergence(s, t, mask, "fkl").item(), rel=1e-12)
    assert L.divergence(s, t, mask, "srkl", skew=0.0).item() == pytest.approx(
        L.divergence(s, t, mask, "rkl").item(), rel=1e-12)
    tvd = L.divergence(s, t, mask, "tvd")
    assert tvd.item() == pytest.approx(L.divergence(t, s, mask, "tvd").item(), rel=1e-12)
    assert 0 < tvd.item() <= 1
    # nearly disjoint distributions: tvd → 1, never above
    far = torch.tensor([[[60.0, 0.0]]]), torch.tensor([[[0.0, 60.0]]])
    assert L.divergence(*far, torch.ones(1, 1), "tvd").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown kind"):
        L.divergence(s, t, mask, "kl")


def test_minus_inf_student_logits_do_not_give_nan():
    s = torch.tensor([[[0.0, -float("inf"), 0.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 0.0, LN2]]])
    out = L.single_step_kl(s, t, torch.ones(1, 1))
    # q = [1/2, 0, 1/2], p = [1/4, 1/4, 1/2]: KL = 1/2 ln 2
    assert out.item() == pytest.approx(0.5 * LN2)
    (grad,) = torch.autograd.grad(out, s)
    assert torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------ chunked
B, T, H, HT, V = 3, 5, 8, 6, 11


class CountingHead(torch.nn.Module):
    """A linear LM head that counts its calls (the number of ZeRO-3 gathers a rank would make)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, vocab)
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        return self.linear(h)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(B, T, HT, generator=g, dtype=torch.float64)
    student, teacher = CountingHead(H, V).double(), CountingHead(HT, V).double()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float64)  # 10 valid
    return hidden, t_hidden, student, teacher, mask


def grads(value, hidden, head):
    return torch.autograd.grad(value, [hidden, head.linear.weight, head.linear.bias])


def assert_same(plain, chunked, hidden, head, atol=1e-12):
    assert chunked.item() == pytest.approx(plain.item(), abs=atol, rel=1e-12)
    for a, b in zip(grads(plain, hidden, head), grads(chunked, hidden, head)):
        assert torch.allclose(a, b, atol=atol, rtol=1e-10)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("chunk_size, num_chunks, expected_calls", [(4, None, 3), (4, 6, 6), (100, None, 1),
                                                                      (3, 2, 4)])
def test_chunked_single_step_kl_equals_plain(setup, chunk_size, num_chunks, expected_calls, fused):
    """Both backward modes: fused (the default for module heads: gradients taken in forward, no head call in
    backward) and checkpointed (each chunk's student and teacher head rerun once in backward)."""
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    weights = torch.rand(B, T, dtype=torch.float64) + 0.5
    for w in (None, weights):
        plain = L.single_step_kl(student(hidden), teacher(t_hidden), mask, temperature=1.5, weights=w)
        student.calls = teacher.calls = 0
        chunked = CL.chunked_single_step_kl(hidden, student, mask, teacher_hidden=t_hidden, teacher_head=teacher,
                                           temperature=1.5, weights=w, chunk_size=chunk_size, num_chunks=num_chunks,
                                           fused=fused)
        assert student.calls == teacher.calls == expected_calls  # 10 valid tokens: uneven last chunk
        assert_same(plain, chunked, hidden, student)
        reruns = 0 if fused is None else expected_calls
        assert student.calls == teacher.calls == expected_calls + reruns


def test_chunked_single_step_kl_with_cached_bf16_teacher_logprobs(setup):
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    with torch.no_grad():
        cached = torch.log_softmax(teacher(t_hidden), -1).bfloat16()  # as cached at scoring time
    plain = L.single_step_kl(student(hidden), cached, mask)
    chunked = CL.chunked_single_step_kl(hidden, student, mask, teacher_logprobs=cached, chunk_size=4)
    assert_same(plain, chunked, hidden, student)
    with pytest.raises(ValueError, match="either"):
        CL.chunked_single_step_kl(hidden, student, mask, teacher_logprobs=cached, teacher_hidden=t_hidden,
                                 teacher_head=teacher)
    with pytest.raises(ValueError, match="either"):
        CL.chunked_single_step_kl(hidden, student, mask)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", L.DIVERGENCES)
def test_chunked_divergence_equals_plain(setup, kind, fused):
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    plain = L.divergence(student(hidden) / 2.0, teacher(t_hidden) / 2.0, mask, kind, beta=0.3, skew=0.2)
    chunked = CL.chunked_divergence(hidden, student, mask, kind, teacher_hidden=t_hidden, teacher_head=teacher,
                                   beta=0.3, skew=0.2, temperature=2.0, chunk_size=4, num_chunks=5, fused=fused)
    assert_same(plain, chunked, hidden, student)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kd_ratio, with_teacher", [(0.5, True), (1.0, True), (0.5, False)])
def test_chunked_pt_loss_equals_plain(setup, kd_ratio, with_teacher, fused):
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    labels[mask == 0] = -100
    t_kwargs = dict(teacher_hidden=t_hidden, teacher_head=teacher) if with_teacher else {}
    plain = L.pt_loss(student(hidden), labels, teacher(t_hidden) if with_teacher else None, kd_ratio=kd_ratio)
    chunked = CL.chunked_pt_loss(hidden, student, labels, kd_ratio=kd_ratio, chunk_size=3, num_chunks=5,
                                fused=fused, **t_kwargs)
    assert_same(plain, chunked, hidden, student)


def test_chunked_token_logprobs_equals_plain(setup):
    hidden, _, student, _, mask = setup
    hidden.requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(6))
    plain = L.token_logprobs(student(hidden), tokens, temperature=0.7) * mask
    chunked = CL.chunked_token_logprobs(hidden, student, tokens, mask, temperature=0.7, chunk_size=4)
    assert torch.allclose(chunked, plain, atol=1e-12)
    probe = torch.randn(B, T, dtype=torch.float64)  # a generic downstream use of the log-probs
    assert_same((plain * probe).sum(), (chunked * probe).sum(), hidden, student)
    with torch.no_grad():  # scoring: no checkpointing, one call per chunk, all positions without a mask
        student.calls = 0
        full = CL.chunked_token_logprobs(hidden, student, tokens, chunk_size=4, num_chunks=6)
    assert student.calls == 6
    assert torch.allclose(full, L.token_logprobs(student(hidden), tokens), atol=1e-12)


@pytest.mark.parametrize("fused, calls", [(False, 4), (None, 2)])
def test_chunked_fully_masked_is_zero_and_every_rank_makes_the_same_head_calls(setup, fused, calls):
    """2 empty chunks: 2 head calls in forward, and 2 more in a checkpointed backward (ZeRO-3 ranks stay in
    step); the fused backward calls nothing."""
    hidden, t_hidden, student, teacher, _ = setup
    hidden.requires_grad_(True)
    none = torch.zeros(B, T)
    student.calls = 0
    out = CL.chunked_single_step_kl(hidden, student, none, teacher_hidden=t_hidden, teacher_head=teacher,
                                   num_chunks=2, fused=fused)
    assert out.item() == 0.0
    g_hidden, g_weight, _ = grads(out, hidden, student)
    assert torch.equal(g_hidden, torch.zeros_like(g_hidden)) and torch.equal(g_weight, torch.zeros_like(g_weight))
    assert student.calls == calls
    assert CL.chunk_count(none, 4) == 1 and CL.chunk_count(torch.ones(B, T), 4) == 4


@pytest.mark.parametrize("fused", [None, False])
def test_chunked_keeps_no_full_vocabulary_tensor_for_backward(fused):
    """Memory: once the forward returns, nothing kept for backward is as large as one chunk's logits (the fused
    path keeps parameter- and hidden-sized gradients, the checkpointed one the chunks' inputs)."""
    import weakref

    g = torch.Generator().manual_seed(7)
    n_b, n_t, vocab, chunk = 4, 16, 257, 16
    hidden = torch.randn(n_b, n_t, H, generator=g, requires_grad=True)
    head, t_head = torch.nn.Linear(H, vocab), torch.nn.Linear(HT, vocab)
    t_hidden = torch.randn(n_b, n_t, HT, generator=g)
    mask = torch.ones(n_b, n_t)
    saved = []

    def pack(t):
        saved.append((t.numel(), weakref.ref(t)))
        return t

    def alive():
        return [numel for numel, ref in saved if ref() is not None]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain = L.single_step_kl(head(hidden), t_head(t_hidden), mask)
    assert max(alive()) >= n_b * n_t * vocab  # the plain loss keeps full [B, L, V] tensors
    del plain
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = CL.chunked_single_step_kl(hidden, head, mask, teacher_hidden=t_hidden, teacher_head=t_head,
                                       chunk_size=chunk, fused=fused)
    assert saved and max(alive()) < chunk * vocab
    out.backward()
    assert torch.isfinite(hidden.grad).all()


def test_fused_gradients_reach_parameter_hooks_once_in_backward_and_scale_with_the_incoming_gradient(setup):
    """The fused path takes gradients in forward without touching ``.grad`` or firing parameter hooks; backward
    delivers them once (a loss scale multiplies them, as DeepSpeed's fp16 scaler does)."""
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    fired = []
    for name, param in student.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    chunked = CL.chunked_single_step_kl(hidden, student, mask, teacher_hidden=t_hidden, teacher_head=teacher,
                                       chunk_size=4)
    assert fired == [] and student.linear.weight.grad is None
    (3.0 * chunked).backward()
    assert sorted(fired) == ["linear.bias", "linear.weight"]
    plain = L.single_step_kl(student(hidden), teacher(t_hidden), mask)
    g_hidden, g_weight, g_bias = torch.autograd.grad(3.0 * plain, [hidden, student.linear.weight, student.linear.bias])
    assert torch.allclose(hidden.grad, g_hidden, atol=1e-12)
    assert torch.allclose(student.linear.weight.grad, g_weight, atol=1e-12)
    assert torch.allclose(student.linear.bias.grad, g_bias, atol=1e-12)


def test_fused_falls_back_to_checkpointing_for_callables_and_zero3_partitioned_heads(setup):
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    plain = L.single_step_kl(student(hidden), teacher(t_hidden), mask)
    with pytest.raises(ValueError, match="fused=True needs an nn.Module"):
        CL.chunked_single_step_kl(hidden, lambda h: student(h), mask, teacher_hidden=t_hidden, teacher_head=teacher,
                                 fused=True)
    student.linear.weight.ds_id = 0  # how DeepSpeed marks a ZeRO-3 partitioned parameter
    try:
        student.calls = 0
        chunked = CL.chunked_single_step_kl(hidden, student, mask, teacher_hidden=t_hidden, teacher_head=teacher,
                                           chunk_size=4)
        assert_same(plain, chunked, hidden, student)
        assert student.calls == 6  # 3 chunks, rerun in backward: checkpointed
    finally:
        del student.linear.weight.ds_id


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("pg_coef, with_teacher, kl_weighted", [(1.0, True, False), (1.0, True, True),
                                                                (0.0, True, False), (1.0, False, False)])
def test_chunked_policy_loss_equals_the_plain_ppo_term_plus_single_step_kl(setup, fused, pg_coef, with_teacher,
                                                                           kl_weighted):
    """One pass over the head gives pg_coef·ppo_clip_loss + single_step_kl (values, gradients, the logged parts
    and the clip fraction as the trainer computes it) and calls each head once per chunk (plus once more per
    chunk in a checkpointed backward)."""
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = L.token_logprobs(student(hidden).detach(), tokens, 0.8) + 0.3 * torch.randn(B, T, generator=g,
                                                                                     dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    s_logits = student(hidden)
    lp = L.token_logprobs(s_logits, tokens, 0.8)
    pg = L.ppo_clip_loss(lp, old, adv, mask, weights=weights, clip_ratio=0.2)
    kl = L.single_step_kl(s_logits, teacher(t_hidden), mask, temperature=0.8,
                          weights=weights if kl_weighted else None) if with_teacher else None
    plain = pg_coef * pg + (kl if with_teacher else 0.0)
    ratio = torch.exp((lp.detach() - old) * mask) * weights
    clip_fraction = L.masked_mean(((ratio - 1).abs() > 0.2).double(), mask)

    student.calls = teacher.calls = 0
    t_kwargs = dict(teacher_hidden=t_hidden, teacher_head=teacher) if with_teacher else {}
    terms = CL.chunked_policy_loss(hidden, student, tokens, mask, old_logprobs=old, advantages=adv, weights=weights,
                                   clip_ratio=0.2, temperature=0.8, pg_coef=pg_coef, kl_weighted=kl_weighted,
                                   chunk_size=4, fused=fused, **t_kwargs)
    assert student.calls == 3 and teacher.calls == (3 if with_teacher else 0)
    assert_same(plain, terms.loss, hidden, student)
    assert student.calls == (3 if fused is None else 6)
    assert terms.pg_loss.item() == pytest.approx(pg.item(), rel=1e-12, abs=1e-12)
    if with_teacher:
        assert terms.single_step_kl.item() == pytest.approx(kl.item(), rel=1e-12)
    else:
        assert terms.single_step_kl is None
    assert terms.clip_fraction.item() == pytest.approx(clip_fraction.item(), abs=1e-12)
    assert 0.0 < terms.clip_fraction.item() < 1.0  # the oracle distinguishes clipped from unclipped tokens
    assert not terms.pg_loss.requires_grad and not terms.clip_fraction.requires_grad


def test_fused_chunks_through_a_tied_lm_head_give_the_plain_gradients():
    """GPT-2 ties its LM head to the input embedding: the fused head gradient and the embedding lookup's gradient
    must add up in the one shared parameter, as in the plain backward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minillm.losses.heads import hidden_and_head

    config = GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    student, teacher = GPT2LMHeadModel(config).double().eval(), GPT2LMHeadModel(config).double().eval()  # no dropout
    assert student.lm_head.weight is student.transformer.wte.weight
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.float64)
    mask[0, 6:] = 0
    params = [p for p in student.parameters()]

    with torch.no_grad():
        t_logits = teacher(ids).logits
    plain = L.single_step_kl(student(ids).logits, t_logits, mask)
    expected = torch.autograd.grad(plain, params)
    hidden, head = hidden_and_head(student, ids)
    with torch.no_grad():
        t_hidden, t_head = hidden_and_head(teacher, ids)
    chunked = CL.chunked_single_step_kl(hidden, head, mask, teacher_hidden=t_hidden, teacher_head=t_head, chunk_size=7,
                                        fused=True)
    got = torch.autograd.grad(chunked, params)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_fused_chunks_inside_a_callers_autocast_region():
    """Called inside autocast (bf16 head matmuls), both backward modes stay within bf16 rounding of the float64
    loss and gradients; the fused path sums its per-chunk weight gradients in fp32, so it is no less accurate."""
    import copy

    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 12, 16, generator=g, requires_grad=True)
    head, t_head = torch.nn.Linear(16, 40), torch.nn.Linear(8, 40)
    t_hidden = torch.randn(2, 12, 8, generator=g)
    mask = torch.ones(2, 12)
    h64 = hidden.detach().double().requires_grad_()
    head64 = copy.deepcopy(head).double()
    ref = L.single_step_kl(head64(h64), copy.deepcopy(t_head).double()(t_hidden.double()), mask.double())
    ref_grads = torch.autograd.grad(ref, [h64, head64.weight])
    errors = {}
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = CL.chunked_single_step_kl(hidden, head, mask, teacher_hidden=t_hidden, teacher_head=t_head,
                                            chunk_size=5, fused=fused)
        assert abs(out.item() - ref.item()) < 1e-2 * abs(ref.item())
        grads = torch.autograd.grad(out, [hidden, head.weight])
        errors[fused] = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(grads, ref_grads)]
        assert max(errors[fused]) < 2e-2  # bf16 keeps 8 bits: ~0.4% per rounding
    assert errors[True][1] <= errors[False][1] * 1.001


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("divergence, temperature, kd_ratio", [("fkl", 1.0, 0.5), ("fkl", 2.0, 0.5), ("rkl", 1.5, 0.3),
                                                               ("jsd", 2.0, 1.0), ("srkl", 0.7, 0.0)])
def test_chunked_kd_loss_equals_the_sft_trainers_plain_loss(setup, fused, divergence, temperature, kd_ratio):
    """(1 − r)·CE + r·KD at temperature T in one head pass, with both temperatures from one head call, equals the
    plain composition (values, gradients, logged parts); without a teacher it is plain CE."""
    hidden, t_hidden, student, teacher, mask = setup
    hidden.requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(11))
    labels[mask == 0] = -100
    s_logits, t_logits = student(hidden), teacher(t_hidden)
    ce = L.pt_loss(s_logits, labels)
    if divergence == "fkl":
        kd = L.pt_loss(s_logits / temperature, labels, t_logits / temperature, kd_ratio=1.0)
    else:
        kd = L.divergence(s_logits / temperature, t_logits / temperature, labels != -100, divergence, beta=0.3,
                          skew=0.2)
    plain = (1 - kd_ratio) * ce + kd_ratio * kd
    student.calls = 0
    terms = CL.chunked_kd_loss(hidden, student, labels, teacher_hidden=t_hidden, teacher_head=teacher,
                               kd_ratio=kd_ratio, divergence=divergence, temperature=temperature, beta=0.3, skew=0.2,
                               chunk_size=4, fused=fused)
    assert student.calls == 3  # one head call per chunk for both terms
    assert_same(plain, terms.loss, hidden, student)
    assert terms.ce.item() == pytest.approx(ce.item(), rel=1e-12)
    assert terms.kd.item() == pytest.approx(kd.item(), rel=1e-12)
    alone = CL.chunked_kd_loss(hidden, student, labels, chunk_size=4, fused=fused)
    assert alone.kd is None
    assert_same(L.pt_loss(student(hidden), labels), alone.loss, hidden, student)
