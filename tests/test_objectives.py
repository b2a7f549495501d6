"""Pure objective functions of issue 8: every word-level divergence's gradient against autograd of a direct
float64 definition, the ranking loss and sequence log-likelihoods against hand values."""

import math

import pytest
import torch

import minillm.losses as L


def direct_divergence(s_logits, t_logits, mask, kind, beta=0.5, skew=0.1):
    """The DESIGN §4 table written out naively with probabilities (float64), token mean over mask."""
    q, p = s_logits.softmax(-1), t_logits.softmax(-1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "fkl":
        per = kl(p, q)
    elif kind == "rkl":
        per = kl(q, p)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        per = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif kind == "tvd":
        per = 0.5 * (p - q).abs().sum(-1)
    elif kind == "sfkl":
        per = kl(p, skew * p + (1 - skew) * q)
    elif kind == "srkl":
        per = kl(q, skew * q + (1 - skew) * p)
    m = mask.double()
    return (per * m).sum() / m.sum()


@pytest.mark.parametrize("kind", L.DIVERGENCES)
@pytest.mark.parametrize("beta, skew", [(0.5, 0.1), (0.2, 0.3), (0.9, 0.0)])
def test_divergence_value_and_gradient_equal_the_direct_definition(kind, beta, skew):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 7, generator=g, dtype=torch.float64) * 1.5
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1]])
    ours = L.divergence(s, t, mask, kind, beta=beta, skew=skew)
    ref = direct_divergence(s, t, mask, kind, beta=beta, skew=skew)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-12), kind
    assert torch.equal(g_ours[1, 1:3], torch.zeros(2, 7, dtype=torch.float64))  # masked positions get nothing


def test_jsd_endpoint_limits_and_skew_endpoints():
    """β → 0 makes the unnormalised JSD vanish continuously (JSD_β/β → KL(p‖q)), so β = 0 itself is defined as that
    limit, the forward KL (GKD/TRL); skew 0 gives plain KL."""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(1, 3, 5, generator=g, dtype=torch.float64), torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 3)
    near = [L.divergence(s, t, mask, "jsd", beta=b).item() for b in (1e-4, 1e-6)]
    assert near[0] > near[1] > 0.0
    fkl = direct_divergence(s, t, mask, "fkl").item()
    assert near[1] / 1e-6 == pytest.approx(fkl, rel=1e-4)
    assert L.divergence(s, t, mask, "jsd", beta=0.0).item() == pytest.approx(fkl, rel=1e-12)
    assert L.divergence(s, t, mask, "sfkl", skew=0.0).item() == pytest.approx(direct_divergence(s, t, mask, "fkl").item())
    assert L.divergence(s, t, mask, "srkl", skew=0.0).item() == pytest.approx(direct_divergence(s, t, mask, "rkl").item())


def test_sequence_logprobs_sum_mean_and_masking():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("-inf"), -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert L.sequence_logprobs(lp, mask).tolist() == [-3.0, -0.5]
    assert L.sequence_logprobs(lp, mask, length_norm=True).tolist() == [-1.5, -0.5]
    assert L.sequence_logprobs(lp, torch.zeros(2, 3)).tolist() == [0.0, 0.0]


def test_ranking_loss_hand_values_and_gradient():
    # pair 0: teacher prefers sample 0 (−1 > −2): y+ = −3, y− = −5, hinge max(0, 1 + 3 − 5) = 0
    # pair 1: teacher prefers sample 0 (−1 > −3): y+ = −4, y− = −2, hinge max(0, 1 + 4 − 2) = 3
    # anchors −6, −8 with λ = 0.5: + 3 and + 4  →  J = ((0 + 3) + (3 + 4)) / 2 = 5
    student = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]])
    anchor = torch.tensor([-6.0, -8.0], requires_grad=True)
    loss = L.ranking_loss(student, teacher, anchor, margin=1.0, anchor_coef=0.5)
    assert loss.item() == 5.0
    gs, ga = torch.autograd.grad(loss, [student, anchor])
    # d/d log q(y+) = −1/N, d/d log q(y−) = +1/N on the active hinge only; d/d anchor = −λ/N
    assert gs.tolist() == [[0.0, 0.0], [-0.5, 0.5]]
    assert ga.tolist() == [-0.25, -0.25]
    # the teacher's preference flips which sample is pushed up
    flipped = L.ranking_loss(student, teacher.flip(1), anchor, margin=1.0, anchor_coef=0.0)
    assert flipped.item() == pytest.approx((max(0, 1 - 5 + 3) + max(0, 1 - 2 + 4)) / 2)
    # a tie picks the first sample as y+; margin 0 and λ 0 on a correctly ordered pair give exactly 0
    tie = L.ranking_loss(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([0.0]), 0.0, 0.0)
    assert tie.item() == 0.0
    with pytest.raises(ValueError, match="N, 2"):
        L.ranking_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="margin"):
        L.ranking_loss(student, teacher, anchor, margin=-1.0)


def test_ranking_loss_matches_the_slide_formula_on_random_pairs():
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(6, 2, generator=g) * 5, torch.randn(6, 2, generator=g) * 5
    anchor = torch.randn(6, generator=g) * 5
    delta, lam = 0.7, 0.3
    expected = 0.0
    for (q0, q1), (p0, p1), a in zip(student.tolist(), teacher.tolist(), anchor.tolist()):
        pos, neg = (q0, q1) if p0 >= p1 else (q1, q0)
        expected += max(0.0, delta - pos + neg) - lam * a
    got = L.ranking_loss(student, teacher, anchor, margin=delta, anchor_coef=lam).item()
    assert got == pytest.approx(expected / 6, rel=1e-6)
    assert math.isfinite(got)
