"""Tests of minillm.generation.engine: the fast teacher-mixed sampler (shared per-step coin, lazy catch-up, static caches).

Oracles: the naive loop (token for token at α ∈ {0, 1}, where neither draws a coin; in distribution otherwise),
exact processed distributions from plain unpadded forwards (chi-square on first tokens and token pairs, given
each coin pattern and marginally over calls), teacher-forced log-probs, and a bigram model with certain
successors (EOS handling).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sampling import (EOS, PAD, batch_of, bigram_llama, chi_square, chi_square_or_impossible, critical_value,
                           exact_next_token, left_padded_prompts, tiny_gpt2, tiny_llama)

from minillm.generation.engine import FastSampleOutput, fast_mixed_sample, left_pad_to_bucket
from minillm.generation.dispatch import sample_rollouts
from minillm.generation.sampling import mixed_sample, teacher_forced_logprobs

WARPED = dict(temperature=0.7, top_k=6, top_p=0.9)
VOCAB = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def models():
    student = tiny_llama(VOCAB, seed=20, head_std=0.3)
    teacher = tiny_gpt2(VOCAB, seed=21, head_std=0.3)
    return student, teacher


def assert_logprobs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to fp32 tolerance; −inf (a token the other model proposed and this one's filter removed) must match."""
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], atol=1e-5, rtol=1e-5)


def seed_with_coins(pattern: list[bool], alpha: float) -> int:
    """A generator seed whose first draws give this coin pattern (the engine draws its coins first)."""
    for seed in range(10_000):
        g = torch.Generator().manual_seed(seed)
        if (torch.rand(len(pattern), generator=g) < alpha).tolist() == pattern:
            return seed
    raise AssertionError("no seed found")


# --------------------------------------------------------------------------------------------- exact equalities
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("settings", [{}, WARPED])
@pytest.mark.parametrize("static", [False, True])
def test_alpha_0_and_1_reproduce_the_naive_loop_token_for_token(models, alpha, settings, static):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [3, 5, 1, 4, 2], seed=1)
    common = dict(max_new_tokens=8, alpha=alpha, eos_token_id=EOS, pad_token_id=PAD, **settings)
    naive = mixed_sample(student, teacher if alpha else None, ids, mask,
                         generator=torch.Generator().manual_seed(5), **common)
    fast = fast_mixed_sample(student, teacher if alpha else None, ids, mask, static_cache=static,
                             generator=torch.Generator().manual_seed(5), **common)
    assert isinstance(fast, FastSampleOutput)
    assert torch.equal(fast.response_ids, naive.response_ids)
    assert torch.equal(fast.response_mask, naive.response_mask)
    assert fast.teacher_steps.tolist() == [alpha == 1.0] * fast.response_ids.shape[1]
    assert_logprobs_close(fast.student_logprobs, naive.student_logprobs)
    assert_logprobs_close(fast.mixed_logprobs, naive.mixed_logprobs)
    if alpha:
        assert_logprobs_close(fast.teacher_logprobs, naive.teacher_logprobs)
        assert fast.student_forwards == 1  # α = 1: the student runs once, at the end, to score the tokens
    else:
        assert fast.teacher_forwards == 0 and fast.teacher_logprobs is None


def test_greedy_mixture_is_the_naive_argmax(models):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [3, 5], seed=2)
    common = dict(max_new_tokens=6, alpha=0.4, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    naive = mixed_sample(student, teacher, ids, mask, **common)
    fast = fast_mixed_sample(student, teacher, ids, mask, **common)
    assert torch.equal(fast.response_ids, naive.response_ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("settings", [{}, WARPED])
def test_logprobs_equal_teacher_forcing_and_static_equals_dynamic(arch, settings):
    """Log-probs gathered across lazy catch-ups equal one teacher-forced forward; the static cache with one fixed
    left-padded mask gives the same tokens (same generator) and log-probs as the dynamic cache."""
    make = tiny_llama if arch == "llama" else tiny_gpt2
    student, teacher = make(16, seed=1), tiny_gpt2(16, seed=2, head_std=0.5)
    ids, mask = left_padded_prompts(16, [3, 6, 1, 4], seed=0)
    outs = []
    for static in (False, True):
        out = fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=12, alpha=0.3, eos_token_id=EOS,
                                pad_token_id=PAD, generator=torch.Generator().manual_seed(3), static_cache=static,
                                **settings)
        coins = out.teacher_steps
        assert 0 < int(coins.sum()) < len(coins)  # both models drew tokens in this run
        # each model ran once per turn it got (catching up on the other's tokens), plus one final scoring catch-up
        heads = int(coins.sum())
        assert out.teacher_forwards <= heads + 1 and out.student_forwards <= len(coins) - heads + 1
        for model, lp in ((student, out.student_logprobs), (teacher, out.teacher_logprobs)):
            forced = teacher_forced_logprobs(model, ids, mask, out.response_ids, out.response_mask, **settings)
            assert_logprobs_close(lp, forced)
        log_mix = torch.logaddexp(math.log(0.7) + out.student_logprobs, math.log(0.3) + out.teacher_logprobs)
        assert_logprobs_close(out.mixed_logprobs, torch.where(out.response_mask.bool(), log_mix,
                                                              torch.zeros_like(log_mix)))
        outs.append(out)
    dynamic, static = outs
    assert torch.equal(dynamic.response_ids, static.response_ids)
    assert_logprobs_close(static.student_logprobs, dynamic.student_logprobs)
    assert_logprobs_close(static.teacher_logprobs, dynamic.teacher_logprobs)


# --------------------------------------------------------------------------------------------- distributions
ROWS = 3000
PROMPTS = [torch.tensor([4, 7, 2, 9, 5]), torch.tensor([8, 3])]


def exact_tables(student, teacher, prompt, settings):
    """Processed next-token tables of both models: first token [V] and second given the first [V, V]."""
    q1, p1 = exact_next_token(student, prompt[None], **settings)[0], exact_next_token(teacher, prompt[None], **settings)[0]
    contexts = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)
    q2, p2 = exact_next_token(student, contexts, **settings), exact_next_token(teacher, contexts, **settings)
    return (q1, q2), (p1, p2)


def joint_table(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """P(y1, y2) with the padding rule: after EOS the second column is PAD."""
    joint = first[:, None] * second
    joint[EOS] = 0.0
    joint[EOS, PAD] = first[EOS]
    return joint


@pytest.mark.parametrize("settings", [{}, WARPED])
@pytest.mark.parametrize("pattern", [[False, True], [True, False]])
def test_given_the_coins_each_row_follows_the_picked_models(models, settings, pattern):
    """Given the coin pattern (the only thing rows share), the rows are independent and token t follows the teacher's
    processed distribution on heads and the student's on tails: chi-square on y1 and on (y1, y2), two prompt lengths
    in one left-padded batch. With coins i.i.d. Bernoulli(α) drawn before any token, the per-token marginal is then
    (1−α)q + αp: the marginal test below checks that too."""
    student, teacher = models
    alpha = 0.5
    ids, mask = batch_of(PROMPTS, ROWS)
    gen = torch.Generator().manual_seed(seed_with_coins(pattern, alpha))
    out = fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=2, alpha=alpha, eos_token_id=EOS,
                            pad_token_id=PAD, generator=gen, score=False, **settings)
    assert out.teacher_steps.tolist() == pattern
    assert out.teacher_logprobs is None and out.mixed_logprobs is None  # score=False
    for i, prompt in enumerate(PROMPTS):
        y = out.response_ids[i * ROWS:(i + 1) * ROWS]
        (q1, q2), (p1, p2) = exact_tables(student, teacher, prompt, settings)
        first, second = (p1 if pattern[0] else q1), (p2 if pattern[1] else q2)
        stat, df = chi_square(torch.bincount(y[:, 0], minlength=VOCAB), first)
        assert stat < critical_value(df), (i, stat, df)
        pairs = torch.bincount(y[:, 0] * VOCAB + y[:, 1], minlength=VOCAB * VOCAB)
        stat, df = chi_square(pairs, joint_table(first, second).flatten())
        assert df > (15 if not settings else 2) and stat < critical_value(df), (i, stat, df)  # top-k: fewer cells
        # power: the other model's table is rejected
        wrong = q1 if pattern[0] else p1
        assert chi_square_or_impossible(torch.bincount(y[:, 0], minlength=VOCAB), wrong) > 3 * critical_value(VOCAB - 1)


def test_marginal_over_calls_is_p_tilde_and_matches_the_naive_sampler(models):
    """Over independent calls (fresh coins each), each row's first token follows p̃ = (1−α)q + αp: chi-square against
    the exact p̃ and a homogeneity test against the naive sampler's draws; the coins come up α of the time."""
    student, teacher = models
    alpha, calls = 0.3, 300
    ids, mask = batch_of(PROMPTS, 1)
    gen = torch.Generator().manual_seed(11)
    fast_counts = torch.zeros(len(PROMPTS), VOCAB, dtype=torch.long)
    heads = 0
    for _ in range(calls):
        out = fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=1, alpha=alpha, eos_token_id=EOS,
                                pad_token_id=PAD, generator=gen, score=False, **WARPED)
        heads += int(out.teacher_steps.sum())
        fast_counts[torch.arange(len(PROMPTS)), out.response_ids[:, 0]] += 1
    sd = math.sqrt(calls * alpha * (1 - alpha))
    assert abs(heads - calls * alpha) < 4 * sd, heads
    big_ids, big_mask = batch_of(PROMPTS, ROWS)
    naive = mixed_sample(student, teacher, big_ids, big_mask, max_new_tokens=1, alpha=alpha, eos_token_id=EOS,
                         pad_token_id=PAD, generator=torch.Generator().manual_seed(12), **WARPED)
    for i, prompt in enumerate(PROMPTS):
        (q1, _), (p1, _) = exact_tables(student, teacher, prompt, WARPED)
        mix = (1 - alpha) * q1 + alpha * p1
        stat, df = chi_square(fast_counts[i], mix)
        assert stat < critical_value(df), (i, stat, df)
        naive_counts = torch.bincount(naive.response_ids[i * ROWS:(i + 1) * ROWS, 0], minlength=VOCAB)
        stat, df = homogeneity(fast_counts[i], naive_counts)
        assert stat < critical_value(df), (i, stat, df)


def homogeneity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Two-sample chi-square homogeneity statistic over the cells with an expected count ≥ 5 in both samples
    (the rest pooled into one cell)."""
    a, b = a.double(), b.double()
    total = a + b
    ea, eb = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    big = (ea >= 5) & (eb >= 5)
    cells_a = torch.cat([a[big], a[~big].sum().view(1)]) if (~big).any() else a[big]
    cells_b = torch.cat([b[big], b[~big].sum().view(1)]) if (~big).any() else b[big]
    t = cells_a + cells_b
    ea, eb = t * a.sum() / t.sum(), t * b.sum() / t.sum()
    keep = t > 0
    stat = float((((cells_a - ea) ** 2 / ea)[keep] + ((cells_b - eb) ** 2 / eb)[keep]).sum())
    return stat, int(keep.sum()) - 1


# --------------------------------------------------------------------------------------------- EOS, errors
def test_eos_stops_rows_pads_after_and_drops_all_padding_columns():
    vocab = 12
    successor = {t: 7 for t in range(vocab)}
    successor.update({2: 4, 4: EOS, 3: 5, 5: 6, 6: EOS})
    model = bigram_llama(vocab, successor)
    ids = torch.tensor([[0, 0, 9, 2], [8, 9, 10, 3], [0, 0, 0, 2], [0, 11, 10, 3]])
    for static in (False, True):
        out = fast_mixed_sample(model, model, ids, (ids != 0).long(), max_new_tokens=6, alpha=0.5, eos_token_id=EOS,
                                pad_token_id=PAD, generator=torch.Generator().manual_seed(0), static_cache=static)
        assert out.response_ids.tolist() == [[4, EOS, PAD], [5, 6, EOS], [4, EOS, PAD], [5, 6, EOS]]
        assert out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
        for lp in (out.student_logprobs, out.teacher_logprobs, out.mixed_logprobs):
            assert torch.isfinite(lp).all() and (lp[out.response_mask == 0] == 0).all()
            assert lp.abs().max() < 1e-6
    out = fast_mixed_sample(model, None, ids, (ids != 0).long(), max_new_tokens=2, alpha=0.0, eos_token_id=[EOS, 99],
                            pad_token_id=PAD)
    assert out.response_ids.tolist() == [[4, EOS], [5, 6], [4, EOS], [5, 6]]  # max_new_tokens caps the length


def test_input_errors_are_clear(models):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [2, 3], seed=0)
    common = dict(max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="needs a teacher"):
        fast_mixed_sample(student, None, ids, mask, alpha=0.2, **common)
    with pytest.raises(ValueError, match="alpha"):
        fast_mixed_sample(student, teacher, ids, mask, alpha=1.5, **common)
    with pytest.raises(ValueError, match="left-padded"):
        fast_mixed_sample(student, teacher, ids.flip(1), mask.flip(1), alpha=0.2, **common)
    with pytest.raises(ValueError, match="cuda_graphs"):
        fast_mixed_sample(student, teacher, ids, mask, alpha=0.2, static_cache=False, cuda_graphs=True, **common)
    with pytest.raises(ValueError, match="unknown rollout engine 'turbo'"):
        sample_rollouts("turbo", student, teacher, ids, mask, alpha=0.2, **common)
    other = tiny_llama(VOCAB + 3, seed=0)
    with pytest.raises(ValueError, match="shared vocabulary"):
        fast_mixed_sample(student, other, ids, mask, alpha=0.5, generator=torch.Generator().manual_seed(0),
                          max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)


def test_sample_rollouts_dispatches(models):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [2, 3], seed=0)
    common = dict(max_new_tokens=4, alpha=1.0, eos_token_id=EOS, pad_token_id=PAD, score=False)
    naive = sample_rollouts("naive", student, teacher, ids, mask, generator=torch.Generator().manual_seed(1), **common)
    fast = sample_rollouts("fast", student, teacher, ids, mask, generator=torch.Generator().manual_seed(1), **common)
    assert type(naive).__name__ == "SampleOutput" and isinstance(fast, FastSampleOutput)
    assert torch.equal(naive.response_ids, fast.response_ids)
    # the speculative engine's own loop (at alpha 1 it hands over to the coin engine); no EOS: all 4 tokens drawn
    common.update(alpha=0.0, eos_token_id=None)
    naive = sample_rollouts("naive", student, None, ids, mask, generator=torch.Generator().manual_seed(1), **common)
    spec = sample_rollouts("speculative", student, None, ids, mask, generator=torch.Generator().manual_seed(1),
                           draft_tokens=3, static_cache=None, cuda_graphs=None, **common)
    assert type(spec).__name__ == "SpeculativeSampleOutput" and spec.rounds == 2  # 4 tokens, 3 per round
    assert torch.equal(naive.response_ids, spec.response_ids)


def test_prompts_are_bucketed_so_static_shapes_repeat():
    ids, mask = left_padded_prompts(VOCAB, [3, 5], seed=0)
    padded_ids, padded_mask = left_pad_to_bucket(ids, mask, PAD, 8)
    assert padded_ids.shape == (2, 8) and torch.equal(padded_ids[:, 3:], ids) and torch.equal(padded_mask[:, 3:], mask)
    assert not padded_mask[:, :3].any() and (padded_ids[:, :3] == PAD).all()
    assert left_pad_to_bucket(padded_ids, padded_mask, PAD, 8)[0] is padded_ids  # already a multiple: untouched


def _compiled_rollout(student, teacher, lengths: list[int], seed: int):
    ids, mask = left_padded_prompts(32, lengths, seed=seed)
    return fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=8, alpha=0.3, eos_token_id=None,
                             pad_token_id=PAD, generator=torch.Generator().manual_seed(seed), static_cache=True,
                             cuda_graphs=True)


@pytest.mark.parametrize("bucket", [64, 1])
def test_compiled_decode_steps_match_eager_and_are_not_recompiled_per_prompt_width(bucket, monkeypatch):
    """The compiled path (HF's get_compiled_call: torch.compile, the CUDA-graph path on GPUs; plain inductor here)
    gives the dynamic cache's tokens and log-probs, and a second batch of another prompt width reuses the compiled
    step: with prompt and cache-length bucketing turned off (bucket 1) that second batch recompiles, which this test
    catches."""
    import torch._dynamo

    monkeypatch.setattr("minillm.generation.engine.STATIC_PROMPT_BUCKET", bucket)
    monkeypatch.setattr("minillm.generation.engine.STATIC_LENGTH_BUCKET", bucket)
    torch._dynamo.reset()  # dynamo's per-function state (sizes seen, shapes made dynamic) must not leak in
    student, teacher = tiny_llama(32, seed=1), tiny_llama(32, seed=2)
    first = _compiled_rollout(student, teacher, [3, 5, 1], seed=0)
    eager = fast_mixed_sample(student, teacher, *left_padded_prompts(32, [3, 5, 1], seed=0), max_new_tokens=8,
                              alpha=0.3, eos_token_id=None, pad_token_id=PAD,
                              generator=torch.Generator().manual_seed(0), static_cache=False, cuda_graphs=False)
    assert torch.equal(first.response_ids, eager.response_ids)
    assert_logprobs_close(first.student_logprobs, eager.student_logprobs)
    assert_logprobs_close(first.teacher_logprobs, eager.teacher_logprobs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        if bucket == 1:
            with pytest.raises(Exception, match="[Rr]ecompil"):
                _compiled_rollout(student, teacher, [7, 9, 2], seed=1)
        else:
            second = _compiled_rollout(student, teacher, [7, 9, 2], seed=1)
            assert second.response_ids.shape == (3, 8)


# --------------------------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_path_matches_the_eager_static_path():
    student = tiny_llama(64, seed=1).cuda()
    teacher = tiny_llama(64, seed=2, hidden_size=64, intermediate_size=128).cuda()
    ids, mask = left_padded_prompts(64, [3, 9, 1, 6], seed=0)
    ids, mask = ids.cuda(), mask.cuda()
    runs = []
    for graphs in (False, True):
        out = fast_mixed_sample(student, teacher, ids, mask, max_new_tokens=24, alpha=0.3, eos_token_id=EOS,
                                pad_token_id=PAD, generator=torch.Generator("cuda").manual_seed(4),
                                static_cache=True, cuda_graphs=graphs)
        runs.append(out)
    eager, graphed = runs
    assert torch.equal(eager.response_ids, graphed.response_ids)
    torch.testing.assert_close(graphed.student_logprobs, eager.student_logprobs, atol=1e-4, rtol=1e-4)
    forced = teacher_forced_logprobs(teacher, ids, mask, graphed.response_ids, graphed.response_mask)
    torch.testing.assert_close(graphed.teacher_logprobs, forced, atol=1e-4, rtol=1e-4)
