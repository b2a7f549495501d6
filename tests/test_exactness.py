"""The exactness oracle (DESIGN §8): the paper-mode MiniLLM update is the exact gradient of KL(q_θ‖p).

A tabular student q_θ(y_t | y_<t) (one row of logits per prefix, an nn.Parameter) and a tabular teacher over a
tiny vocabulary with an EOS token and a maximum length. Every sequence is enumerated with its probability, so
both sides are computed without sampling:

* exact:     ∇_θ KL(q_θ‖p) = ∇_θ Σ_y q_θ(y) log(q_θ(y)/p(y)), by autograd;
* surrogate: Σ_y q_θ(y) · ∇_θ S(y), where S(y) is the per-sequence loss the trainer builds from the library
  functions (rewards → long-range advantages → PPO surrogate, plus the single-step KL), and q_θ(y) is a constant
  weight (it plays the role of the sampling distribution).

In the paper mode (include_current=False, γ = 1, no length normalisation, no whitening, α = 0, no clipping) the
two agree to float64 round-off. In the reference mode (include_current=True, γ = 0.95, length_norm=True) they
do not: the current step's KL gradient is counted twice (once sampled, once exact), see DESIGN §4.
"""

import itertools

import pytest
import torch

from minillm import losses as L


class Tables:
    """Student and teacher logit tables indexed by prefix; sequences end at EOS or at max_len tokens."""

    def __init__(self, vocab: int, max_len: int, seed: int):
        self.vocab, self.max_len, self.eos = vocab, max_len, vocab - 1
        words = range(vocab - 1)  # non-EOS tokens: only they can extend a prefix
        prefixes = [p for n in range(max_len) for p in itertools.product(words, repeat=n)]
        self.row = {p: i for i, p in enumerate(prefixes)}
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(len(prefixes), vocab, generator=g, dtype=torch.float64) * 1.5)
        self.teacher = torch.randn(len(prefixes), vocab, generator=g, dtype=torch.float64) * 1.5

    def sequences(self):
        """Every complete sequence: words then EOS, or max_len tokens (the last one may be anything)."""
        words = range(self.vocab - 1)
        for n in range(self.max_len):
            for body in itertools.product(words, repeat=n):
                yield body + (self.eos,)
        for body in itertools.product(words, repeat=self.max_len - 1):
            for last in range(self.vocab - 1):  # ending in EOS is already listed above
                yield body + (last,)

    def logits(self, table: torch.Tensor, y: tuple) -> torch.Tensor:
        """[1, max_len, V]: row t is the table row of prefix y_<t; padding rows (after EOS) reuse row 0."""
        rows = [self.row[y[:t]] if t < len(y) else 0 for t in range(self.max_len)]
        return table[rows].unsqueeze(0)

    def response(self, y: tuple) -> torch.Tensor:
        """[1, max_len]: the sequence padded with EOS, as the rollout pads finished rows."""
        return torch.tensor([list(y) + [self.eos] * (self.max_len - len(y))])

    def seq_logprob(self, table: torch.Tensor, y: tuple) -> torch.Tensor:
        lp = torch.log_softmax(self.logits(table, y)[0, : len(y)], -1)
        return lp.gather(-1, torch.tensor(y).unsqueeze(-1)).sum()


def exact_kl_gradient(tab: Tables) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = list(tab.sequences())
    log_q = torch.stack([tab.seq_logprob(tab.theta, y) for y in seqs])
    log_p = torch.stack([tab.seq_logprob(tab.teacher, y) for y in seqs])
    assert torch.allclose(log_q.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)  # all enumerated
    assert torch.allclose(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    (grad,) = torch.autograd.grad(kl, tab.theta)
    return kl.detach(), grad


def expected_update(tab: Tables, *, include_current: bool, gamma: float, length_norm: bool,
                    reward_scale: float = 1.0) -> torch.Tensor:
    """Σ_y q(y)·∇S(y) with S(y) built from the library functions exactly as the trainer does (minus whitening)."""
    total = torch.zeros((), dtype=torch.float64)
    for y in tab.sequences():
        response = tab.response(y)
        mask = L.response_mask(response, tab.eos).double()
        s_logits = tab.logits(tab.theta, y)
        t_logits = tab.logits(tab.teacher, y)
        logprobs = L.token_logprobs(s_logits, response) * mask
        old = logprobs.detach()  # the sampling student is the current one (first PPO step)
        teacher_lp = L.token_logprobs(t_logits, response) * mask
        rewards = L.token_rewards(teacher_lp, old, mask, scale=reward_scale, clip=None)
        advantages = L.long_range_advantages(rewards, mask, gamma=gamma, length_norm=length_norm,
                                             include_current=include_current)
        weights = L.importance_weights(old, teacher_lp, mask, alpha=0.0)  # α = 0: samples come from q itself
        pg = L.ppo_clip_loss(logprobs, old, advantages, mask, weights=weights, clip_ratio=1e9)  # clip inactive
        single = L.single_step_kl(s_logits, t_logits, mask)
        # ppo_clip_loss and single_step_kl return token *means* over the batch (here: this one sequence). The
        # policy-gradient identity holds for per-sequence *sums* Σ_t, so multiply back by the number of valid
        # tokens. (In a real batch the token mean is a constant 1/E[T] rescaling of this in the large-batch
        # limit, which does not change the direction of the update.)
        n_tokens = mask.sum()
        surrogate = n_tokens * (pg + single)
        q_y = tab.seq_logprob(tab.theta, y).exp().detach()  # the sampling probability: a constant weight
        total = total + q_y * surrogate
    (grad,) = torch.autograd.grad(total, tab.theta)
    return grad


CASES = [(3, 3, 0), (3, 3, 1), (3, 3, 2), (4, 2, 3)]  # (vocab incl. EOS, max length, seed)


@pytest.mark.parametrize("vocab, max_len, seed", CASES)
def test_paper_mode_expected_update_is_the_exact_reverse_kl_gradient(vocab, max_len, seed):
    tab = Tables(vocab, max_len, seed)
    kl, exact = exact_kl_gradient(tab)
    assert kl > 0.05  # the tables really differ
    got = expected_update(tab, include_current=False, gamma=1.0, length_norm=False)
    assert torch.allclose(got, exact, atol=1e-6, rtol=0), (got - exact).abs().max()
    assert (got - exact).abs().max() < 1e-12  # in fact equal to round-off


def test_paper_mode_needs_both_halves():
    """Sensitivity of the oracle: dropping either the single-step or the long-range term breaks the identity."""
    tab = Tables(3, 3, 0)
    _, exact = exact_kl_gradient(tab)
    full = expected_update(tab, include_current=False, gamma=1.0, length_norm=False)
    # the long-range half alone = full minus the exact single-step half, computed separately by enumeration
    single = torch.zeros((), dtype=torch.float64)
    for y in tab.sequences():
        mask = L.response_mask(tab.response(y), tab.eos).double()
        q_y = tab.seq_logprob(tab.theta, y).exp().detach()
        single = single + q_y * mask.sum() * L.single_step_kl(tab.logits(tab.theta, y), tab.logits(tab.teacher, y),
                                                              mask)
    (single_grad,) = torch.autograd.grad(single, tab.theta)
    assert single_grad.norm() > 1e-2 and (full - single_grad).norm() > 1e-2
    assert (single_grad - exact).norm() / exact.norm() > 1e-2  # the single-step half alone is not the gradient
    assert (full - single_grad - exact).norm() / exact.norm() > 1e-2  # nor is the long-range half alone


# Recorded numbers (torch 2.13, float64): cosine similarity / relative error ‖g − g_exact‖/‖g_exact‖ of the
# expected update versus the exact gradient. "reference" is the asserted case: include_current=True, γ = 0.95,
# length_norm=True, reward scale 1, no whitening. "double count": include_current=True alone (γ = 1, no length
# norm). "scale 0.5": the reference with its reward scale too. The paper mode matched to ≤ 4.4e-16 everywhere.
#   case (V, T, seed)   reference         double count      scale 0.5
#   (3, 3, 0)           0.6695 / 0.9507   0.8982 / 0.7102   0.7436 / 1.3016
#   (3, 3, 1)           0.9128 / 0.7194   0.9794 / 0.9583   0.8980 / 1.2644
#   (3, 3, 2)          -0.4532 / 1.8602   0.2871 / 1.1259  -0.2459 / 1.8303
#   (4, 2, 3)           0.9949 / 0.4468   0.9998 / 0.8992   0.9913 / 0.9818
# Random tables lie far apart, so the gaps are large; the point is that only the paper mode is exact.
@pytest.mark.parametrize("vocab, max_len, seed", CASES)
def test_reference_mode_is_not_the_exact_gradient(vocab, max_len, seed):
    tab = Tables(vocab, max_len, seed)
    _, exact = exact_kl_gradient(tab)
    ref = expected_update(tab, include_current=True, gamma=0.95, length_norm=True)
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(), exact.flatten(), dim=0).item()
    rel_err = ((ref - exact).norm() / exact.norm()).item()
    report = f"reference mode vs exact (V={vocab}, T={max_len}, seed={seed}): cos={cosine:.4f} rel={rel_err:.4f}"
    assert rel_err > 1e-3, report
    assert cosine < 1 - 1e-6, report
