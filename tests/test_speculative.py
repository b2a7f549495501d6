"""Tests of minillm.generation.speculative: teacher-mixed sampling with the student drafting and the teacher verifying.

Oracles: exact whole-sequence p̃ tables enumerated from plain unpadded forwards (chi-square on thousands of draws),
the product of those tables for pairs of rows (independence), the naive loop (homogeneity on a left-padded batch;
token for token at α ∈ {0, 1} and greedy), compact unpadded forwards (holes in the slot layout), teacher-forced
log-probs, hand-built bigram models with certain successors (EOS, forward counts) and the closed-form acceptance
rate 1 − α·TV(q, p) of one token.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_engine import homogeneity
from test_sampling import (EOS, PAD, batch_of, bigram_llama, chi_square, chi_square_or_impossible, critical_value,
                           exact_next_token, left_padded_prompts, teacher_mask, tiny_gpt2, tiny_llama)

from minillm.generation.engine import fast_mixed_sample
from minillm.generation.sampling import SampleOutput, mixed_sample, teacher_forced_logprobs
from minillm.generation.speculative import SpeculativeSampleOutput, _SlotLM, speculative_mixed_sample

VOCAB = 6
WARPED = dict(temperature=0.7, top_k=4, top_p=0.9)
PROMPT = torch.tensor([4, 2, 5, 3, 2])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def models():
    """Two architectures whose processed distributions differ (TV ≈ 0.35, ≈ 0.6 warped), so drafts are rejected
    often; the EOS row of each head is shrunk so that most sequences run to the end."""
    student = tiny_llama(VOCAB, seed=30, head_std=0.2)
    teacher = tiny_gpt2(VOCAB, seed=31, head_std=0.2)
    with torch.no_grad():
        student.lm_head.weight[EOS] *= 0.2
        teacher.lm_head.weight[EOS] *= 0.2
    return student, teacher


def sample(student, teacher, ids, mask, **kwargs) -> SpeculativeSampleOutput:
    kwargs = {"eos_token_id": EOS, "pad_token_id": PAD, **kwargs}
    return speculative_mixed_sample(student, teacher, ids, mask, **kwargs)


def exact_sequences(student, teacher, prompt: torch.Tensor, alpha: float, length: int, settings: dict) -> torch.Tensor:
    """[V**length] exact p̃ of every response, indexed by its base-V code (first token most significant), with the
    padding rule: after EOS every token is PAD. Built level by level from plain forwards of the unpadded prompt and
    every prefix."""
    probs = torch.ones(1, dtype=torch.float64)
    prefixes = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(length):
        contexts = torch.cat([prompt.expand(len(prefixes), -1), prefixes], dim=1)
        q = exact_next_token(student, contexts, **settings).double()
        mix = q if alpha == 0.0 else (1 - alpha) * q + alpha * exact_next_token(teacher, contexts, **settings).double()
        ended = (prefixes == EOS).any(1)
        mix[ended] = torch.nn.functional.one_hot(torch.tensor(PAD), VOCAB).double()
        probs = (probs[:, None] * mix).flatten()
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(prefixes))[:, None]],
                             dim=1)
    return probs


def codes(response: torch.Tensor, length: int) -> torch.Tensor:
    """[N, ≤ length] responses → [N] base-V codes (dropped trailing columns are PAD)."""
    full = torch.cat([response, response.new_full((len(response), length - response.shape[1]), PAD)], dim=1)
    weights = VOCAB ** torch.arange(length - 1, -1, -1)
    return (full * weights).sum(1)


# --------------------------------------------------------------------------------------------- distributions
DRAWS = 4000


@pytest.mark.parametrize("settings", [{}, WARPED], ids=["plain", "warped"])
@pytest.mark.parametrize("draft_tokens", [1, 3])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_whole_sequences_follow_p_tilde_exactly(models, alpha, draft_tokens, settings):
    """Chi-square of 4000 whole three-token responses against the enumerated p̃ sequence table; the same draws
    reject the pure-student and pure-teacher tables (the test has power)."""
    student, teacher = models
    length = 3
    ids, mask = batch_of([PROMPT], DRAWS)
    gen = torch.Generator().manual_seed(100 + int(alpha * 10) + draft_tokens)
    out = sample(student, teacher, ids, mask, max_new_tokens=length, alpha=alpha, generator=gen,
                 draft_tokens=draft_tokens, **settings)
    counts = torch.bincount(codes(out.response_ids, length), minlength=VOCAB ** length)
    stat, df = chi_square(counts, exact_sequences(student, teacher, PROMPT, alpha, length, settings))
    assert df > 15 and stat < critical_value(df), (stat, df)
    if alpha >= 0.5:
        q_table = exact_sequences(student, teacher, PROMPT, 0.0, length, settings)
        assert chi_square_or_impossible(counts, q_table) > 3 * critical_value(df)
    if alpha <= 0.5:
        p_table = exact_sequences(teacher, teacher, PROMPT, 0.0, length, settings)
        assert chi_square_or_impossible(counts, p_table) > 3 * critical_value(df)
    assert out.accepted_drafts < out.proposed_drafts  # rejections happened, so replacements were drawn


def test_rows_of_one_batch_are_independent(models):
    """Pairs of rows with the same prompt in one batch: the joint table of (row a's response, row b's response)
    is the product of the exact p̃ marginals (chi-square over the 36 × 36 cells, small ones pooled)."""
    student, teacher = models
    length, pairs = 2, 4000
    ids, mask = batch_of([PROMPT], 2 * pairs)
    out = sample(student, teacher, ids, mask, max_new_tokens=length, alpha=0.5, draft_tokens=2,
                 generator=torch.Generator().manual_seed(7), **WARPED)
    code = codes(out.response_ids, length)
    cells = VOCAB ** length
    joint = torch.bincount(code[0::2] * cells + code[1::2], minlength=cells * cells)
    marginal = exact_sequences(student, teacher, PROMPT, 0.5, length, WARPED)
    stat, df = chi_square(joint, (marginal[:, None] * marginal[None, :]).flatten())
    assert df > 30 and stat < critical_value(df), (stat, df)


def test_independent_rows_where_the_coin_engine_couples_them():
    """Contrast: student certain of token 4, teacher certain of token 5, α = 0.5. The coin engine's shared coin
    gives every row of a batch the same token; here each row is an independent fair pick."""
    vocab, rows = 8, 2000
    student = bigram_llama(vocab, {t: 4 for t in range(vocab)})
    teacher = bigram_llama(vocab, {t: 5 for t in range(vocab)})
    ids, mask = batch_of([torch.tensor([3, 2])], rows)
    common = dict(max_new_tokens=1, alpha=0.5, eos_token_id=EOS, pad_token_id=PAD)
    coin = fast_mixed_sample(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), **common)
    assert len(set(coin.response_ids[:, 0].tolist())) == 1
    out = speculative_mixed_sample(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), **common)
    first = out.response_ids[:, 0]
    assert set(first.tolist()) == {4, 5}
    pair = (first[0::2] == 5).long() * 2 + (first[1::2] == 5).long()
    stat, df = chi_square(torch.bincount(pair, minlength=4), torch.full((4,), 0.25))
    assert stat < critical_value(df), stat


def test_left_padded_batch_agrees_with_the_naive_sampler(models):
    """Two prompt lengths in one left-padded batch: per prompt, the three-token responses pass a homogeneity test
    against the naive loop's draws and a chi-square against the exact table."""
    student, teacher = models
    prompts, rows, length, alpha = [PROMPT, torch.tensor([5, 3])], 3000, 3, 0.5
    ids, mask = batch_of(prompts, rows)
    common = dict(max_new_tokens=length, alpha=alpha, **WARPED)
    spec = sample(student, teacher, ids, mask, draft_tokens=2, generator=torch.Generator().manual_seed(1), **common)
    naive = mixed_sample(student, teacher, ids, mask, eos_token_id=EOS, pad_token_id=PAD,
                         generator=torch.Generator().manual_seed(2), **common)
    for i, prompt in enumerate(prompts):
        part = slice(i * rows, (i + 1) * rows)
        spec_counts = torch.bincount(codes(spec.response_ids[part], length), minlength=VOCAB ** length)
        naive_counts = torch.bincount(codes(naive.response_ids[part], length), minlength=VOCAB ** length)
        stat, df = homogeneity(spec_counts, naive_counts)
        assert df > 15 and stat < critical_value(df), (i, stat, df)
        stat, df = chi_square(spec_counts, exact_sequences(student, teacher, prompt, alpha, length, WARPED))
        assert stat < critical_value(df), (i, stat, df)


# --------------------------------------------------------------------------------------------- exact equalities
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_0_and_1_reproduce_the_naive_loop_token_for_token(models, alpha):
    """α = 0 drafts from q and accepts everything (same draws as the naive loop); α = 1 is the teacher-only route."""
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [3, 5, 1, 4, 2], seed=1)
    common = dict(max_new_tokens=8, alpha=alpha, eos_token_id=EOS, pad_token_id=PAD, **WARPED)
    calls = []
    hook = teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = speculative_mixed_sample(student, teacher if alpha else None, ids, mask, draft_tokens=3,
                                       generator=torch.Generator().manual_seed(5), **common)
    finally:
        hook.remove()
    naive = mixed_sample(student, teacher if alpha else None, ids, mask, generator=torch.Generator().manual_seed(5),
                         **common)
    assert isinstance(out, SpeculativeSampleOutput)
    assert torch.equal(out.response_ids, naive.response_ids) and torch.equal(out.response_mask, naive.response_mask)
    torch.testing.assert_close(out.student_logprobs, naive.student_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mixed_logprobs, naive.mixed_logprobs, atol=1e-5, rtol=1e-5)
    if alpha:
        assert out.rounds == out.proposed_drafts == 0 and out.teacher_forwards == len(calls) > 0
    else:
        assert calls == [] and out.teacher_forwards == 0 and out.teacher_logprobs is None
        assert out.accepted_drafts == out.proposed_drafts == int(out.response_mask.sum())


def test_greedy_is_the_naive_argmax(models):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [3, 5], seed=2)
    common = dict(max_new_tokens=6, alpha=0.4, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    out = speculative_mixed_sample(student, teacher, ids, mask, **common)
    assert type(out) is SampleOutput
    assert torch.equal(out.response_ids, mixed_sample(student, teacher, ids, mask, **common).response_ids)


def opt_model(vocab: int, seed: int):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=PAD, bos_token_id=PAD,
                       eos_token_id=EOS, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_hole_slots_give_the_logits_of_the_compact_sequence(arch):
    """The slot layout of the engine: a left-padded prefill, a 4-slot chunk whose trailing slots become holes
    afterwards (rejected drafts), a 4-slot chunk with holes in the middle, then single-slot steps. Hole slots hold
    junk tokens at junk positions; every valid slot's logits equal those of the row's compact unpadded sequence."""
    vocab = 24
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": opt_model}[arch](vocab, seed=3)
    ids, mask = left_padded_prompts(vocab, [4, 2, 6], seed=4)
    gen = torch.Generator().manual_seed(5)
    slots = 11
    valid = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1],  # chunk A: 4 slots | chunk B: 4 | 3 single steps
                          [1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1],
                          [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    tokens = torch.randint(2, vocab, (3, slots), generator=gen)
    first = mask.sum(1, keepdim=True)  # position of the first response token
    positions = torch.where(valid, first + valid.long().cumsum(1) - 1, torch.randint(0, 40, (3, slots), generator=gen))
    lm = _SlotLM(model, torch.device("cpu"), None)
    got = [lm.forward(ids, (mask.cumsum(1) - 1).clamp(min=0), mask, 1)]
    # chunk A is fed with every slot 1 (as drafts are) and its holes are marked only afterwards
    a_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    got.append(lm.forward(tokens[:, :4], positions[:, :4], a_mask, 4))
    seen = torch.cat([mask, valid[:, :8].long()], 1)
    got.append(lm.forward(tokens[:, 4:8], positions[:, 4:8], seen, 4))
    for j in range(8, slots):
        seen = torch.cat([mask, valid[:, :j + 1].long()], 1)
        got.append(lm.forward(tokens[:, j:j + 1], positions[:, j:j + 1], seen, 1))
    got = torch.cat(got, 1)  # [3, 1 + slots, V]: logits after the prompt, then after each slot
    for row in range(3):
        prompt = ids[row, mask[row].bool()]
        compact = torch.cat([prompt, tokens[row, valid[row]]])
        with torch.no_grad():
            expected = model(input_ids=compact[None]).logits[0, len(prompt) - 1:]
        # chunk A's slots after a hole are fed before the hole is marked: as in the engine, only its valid prefix
        a_prefix = int(valid[row, :4].long().cumprod(0).sum())
        kept = [0] + [1 + j for j in range(slots) if valid[row, j] and (j >= 4 or j < a_prefix)]
        compact_index = [0] + [int(valid[row, :j + 1].sum()) for j in range(slots) if valid[row, j]
                               and (j >= 4 or j < a_prefix)]
        torch.testing.assert_close(got[row, kept], expected[compact_index], atol=1e-5, rtol=1e-5)
        assert len(kept) >= 6


@pytest.mark.parametrize("alpha,draft_tokens,settings", [(0.3, 2, {}), (0.7, 4, dict(temperature=0.8, top_k=9,
                                                                                        top_p=0.9))])
def test_logprobs_equal_teacher_forcing(alpha, draft_tokens, settings):
    """Log-probs gathered from drafts, verifications and replacements over several rounds equal one teacher-forced
    forward; mixed = log((1−α)q + αp); masks end at the first EOS (two EOS ids), PAD after it."""
    vocab = 16
    student, teacher = tiny_llama(vocab, seed=9), tiny_gpt2(vocab, seed=10, head_std=0.5)
    ids, mask = left_padded_prompts(vocab, [4, 1, 6, 3, 6, 2], seed=11)
    out = speculative_mixed_sample(student, teacher, ids, mask, max_new_tokens=12, alpha=alpha,
                                   eos_token_id=[EOS, 2], pad_token_id=PAD, draft_tokens=draft_tokens,
                                   generator=torch.Generator().manual_seed(12), **settings)
    resp, rmask = out.response_ids, out.response_mask
    assert out.rounds > 2 and out.accepted_drafts < out.proposed_drafts == int(rmask.sum())
    assert torch.equal(rmask, torch.minimum(teacher_mask(resp, EOS), teacher_mask(resp, 2)))
    assert (resp[rmask == 0] == PAD).all() and rmask[:, -1].any()
    for model, lp in ((student, out.student_logprobs), (teacher, out.teacher_logprobs)):
        forced = teacher_forced_logprobs(model, ids, mask, resp, rmask, **settings)
        assert torch.equal(torch.isinf(lp), torch.isinf(forced))
        finite = torch.isfinite(forced)
        torch.testing.assert_close(lp[finite], forced[finite], atol=1e-5, rtol=1e-5)
    mixed = torch.logaddexp(math.log(1 - alpha) + out.student_logprobs, math.log(alpha) + out.teacher_logprobs)
    torch.testing.assert_close(out.mixed_logprobs, torch.where(rmask.bool(), mixed, torch.zeros_like(mixed)))
    assert torch.isfinite(out.mixed_logprobs).all() and (out.mixed_logprobs[rmask == 0] == 0).all()


# --------------------------------------------------------------------------------------------- EOS, bookkeeping, errors
@pytest.mark.parametrize("draft_tokens", [1, 2, 4])
def test_eos_stops_rows_pads_after_and_drops_all_padding_columns(draft_tokens):
    vocab = 12
    successor = {t: 7 for t in range(vocab)}
    successor.update({2: 4, 4: EOS, 3: 5, 5: 6, 6: EOS})
    model = bigram_llama(vocab, successor)
    ids = torch.tensor([[0, 0, 9, 2], [8, 9, 10, 3], [0, 0, 0, 2], [0, 11, 10, 3]])
    out = speculative_mixed_sample(model, model, ids, (ids != 0).long(), max_new_tokens=6, alpha=0.5,
                                   eos_token_id=EOS, pad_token_id=PAD, draft_tokens=draft_tokens,
                                   generator=torch.Generator().manual_seed(0))
    assert out.response_ids.tolist() == [[4, EOS, PAD], [5, 6, EOS], [4, EOS, PAD], [5, 6, EOS]]
    assert out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    for lp in (out.student_logprobs, out.teacher_logprobs, out.mixed_logprobs):
        assert torch.isfinite(lp).all() and (lp[out.response_mask == 0] == 0).all()
        assert lp.abs().max() < 1e-6
    assert out.rounds == math.ceil(3 / draft_tokens)  # p = q: every draft is accepted
    out = speculative_mixed_sample(model, None, ids, (ids != 0).long(), max_new_tokens=2, alpha=0.0,
                                   eos_token_id=[EOS, 99], pad_token_id=PAD, draft_tokens=draft_tokens)
    assert out.response_ids.tolist() == [[4, EOS], [5, 6], [4, EOS], [5, 6]]  # max_new_tokens caps the length


@pytest.mark.parametrize("length,draft_tokens", [(7, 3), (8, 4), (5, 1), (3, 5)])
def test_forward_counts_when_every_draft_is_accepted(length, draft_tokens):
    """p = q (one bigram model as both): all drafts pass, so a round makes min(k, tokens left) tokens (k may exceed
    max_new_tokens); the student runs once per token, the teacher once per round."""
    vocab = 10
    model = bigram_llama(vocab, {t: (t + 1) % vocab if t + 1 != EOS else 2 for t in range(vocab)})  # never EOS
    ids, mask = left_padded_prompts(vocab, [3, 1, 4], seed=0)
    out = speculative_mixed_sample(model, model, ids, mask, max_new_tokens=length, alpha=0.6, eos_token_id=EOS,
                                   pad_token_id=PAD, draft_tokens=draft_tokens)
    rounds = math.ceil(length / draft_tokens)
    assert out.response_ids.shape == (3, length) and out.response_mask.all()
    assert (out.rounds, out.teacher_forwards, out.student_forwards) == (rounds, rounds, length)
    assert out.accepted_drafts == out.proposed_drafts == 3 * length


def test_acceptance_rate_is_one_minus_alpha_tv(models):
    """One token per row: P(accept) = Σ_v min(q(v), p̃(v)) = 1 − α·TV(q, p) exactly; 4000 rows land within 4 σ.
    Over longer responses the per-token rate stays ≥ 1 − α; the teacher runs once per round."""
    student, teacher = models
    alpha = 0.6
    ids, mask = batch_of([PROMPT], DRAWS)
    out = sample(student, teacher, ids, mask, max_new_tokens=1, alpha=alpha, generator=torch.Generator().manual_seed(3))
    q, p = exact_next_token(student, PROMPT[None])[0], exact_next_token(teacher, PROMPT[None])[0]
    expected = 1.0 - alpha * float((q - p).abs().sum() / 2)
    assert out.proposed_drafts == DRAWS and out.rounds == 1 == out.teacher_forwards
    assert abs(out.accepted_drafts / DRAWS - expected) < 4 * math.sqrt(expected * (1 - expected) / DRAWS)
    assert expected < 0.9  # the models differ enough for the number to mean something
    out = sample(student, teacher, ids[:1000], mask[:1000], max_new_tokens=8, alpha=alpha, draft_tokens=3,
                 generator=torch.Generator().manual_seed(4), **WARPED)
    assert out.teacher_forwards == out.rounds and out.rounds <= out.student_forwards <= 3 * out.rounds
    assert out.proposed_drafts == int(out.response_mask.sum()) and out.accepted_drafts < out.proposed_drafts
    assert out.accepted_drafts / out.proposed_drafts > 1 - alpha - 0.03


def test_input_errors_are_clear(models):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [2, 3], seed=0)
    common = dict(max_new_tokens=2, alpha=0.5, eos_token_id=EOS, pad_token_id=PAD)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="draft_tokens"):
            speculative_mixed_sample(student, teacher, ids, mask, draft_tokens=bad, **common)
    with pytest.raises(ValueError, match="static_cache=True is not supported"):
        speculative_mixed_sample(student, teacher, ids, mask, static_cache=True, **common)
    with pytest.raises(ValueError, match="cuda_graphs=True is not supported"):
        speculative_mixed_sample(student, teacher, ids, mask, cuda_graphs=True, **common)
    cuda_generator = SimpleNamespace(device=torch.device("cuda"))  # all the check reads; no GPU needed
    with pytest.raises(ValueError, match="generator lives on cuda"):
        speculative_mixed_sample(student, teacher, ids, mask, generator=cuda_generator, **common)
    with pytest.raises(ValueError, match="shared vocabulary"):
        speculative_mixed_sample(student, tiny_llama(VOCAB + 3, seed=0), ids, mask, **common)
    with pytest.raises(ValueError, match="needs a teacher"):
        speculative_mixed_sample(student, None, ids, mask, **common)
    with pytest.raises(ValueError, match="left-padded"):
        speculative_mixed_sample(student, teacher, ids.flip(1), mask.flip(1), **common)
    # with vocab_size both models' logits are cut to the shared entries, and the sizes may then differ
    out = speculative_mixed_sample(student, tiny_llama(VOCAB + 3, seed=0), ids, mask, vocab_size=VOCAB, **common)
    assert (out.response_ids < VOCAB).all()


def test_output_moves_every_field(models):
    student, teacher = models
    ids, mask = left_padded_prompts(VOCAB, [2, 3], seed=0)
    out = sample(student, teacher, ids, mask, max_new_tokens=3, alpha=0.5)
    moved = out.to("meta")
    assert isinstance(moved, SpeculativeSampleOutput) and moved.response_ids.device.type == "meta"
    assert moved.teacher_logprobs.device.type == "meta" and moved.rounds == out.rounds


# --------------------------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_teacher_forcing():
    student, teacher = tiny_llama(64, seed=1).cuda(), tiny_gpt2(64, seed=2, head_std=0.5).cuda()
    ids, mask = left_padded_prompts(64, [3, 9, 1, 6], seed=0)
    ids, mask = ids.cuda(), mask.cuda()
    out = speculative_mixed_sample(student, teacher, ids, mask, max_new_tokens=24, alpha=0.3, eos_token_id=EOS,
                                   pad_token_id=PAD, generator=torch.Generator("cuda").manual_seed(4), draft_tokens=4)
    assert out.response_ids.is_cuda and out.teacher_forwards == out.rounds
    assert out.proposed_drafts == int(out.response_mask.sum())
    for model, lp in ((student, out.student_logprobs), (teacher, out.teacher_logprobs)):
        forced = teacher_forced_logprobs(model, ids, mask, out.response_ids, out.response_mask)
        torch.testing.assert_close(lp, forced, atol=1e-4, rtol=1e-4)
