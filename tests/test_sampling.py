"""Tests of minillm.generation.sampling: the warpers, the teacher-mixed decoding loop, and teacher-forced scoring.

The oracles: HF's own warpers and ``generate`` (greedy, α = 0), full-sequence forwards without a cache
(log-probs), exact p̃ from unpadded forwards (chi-square on thousands of draws), and a hand-built bigram model
whose next token is fixed (EOS handling).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minillm.generation.sampling import SampleOutput, mixed_sample, process_logits, teacher_forced_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model calls: see conftest.py

PAD, EOS = 0, 1


# --------------------------------------------------------------------------------------------- tiny models
def tiny_llama(vocab: int, seed: int, head_std: float = 0.5, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=PAD,
                    eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    config = LlamaConfig(**{**settings, **overrides})
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wide LM head makes the distributions peaked enough to tell models apart
        model.lm_head.weight.normal_(0.0, head_std)
    return model.eval()


def tiny_gpt2(vocab: int, seed: int, embed_std: float = 0.3, dropout: float = 0.0,
              head_std: float | None = None) -> GPT2LMHeadModel:
    """GPT-2 with a tied head (larger embeddings: peaked, token-dependent outputs), or an untied one of
    ``head_std`` (tied heads favour repeating the last token, too peaked for the distribution test)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=PAD,
                        eos_token_id=EOS, pad_token_id=PAD, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, tie_word_embeddings=head_std is None)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, embed_std)
        if head_std is not None:
            model.lm_head.weight.normal_(0.0, head_std)
    return model.eval()


def batch_of(prompts: list[torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` copies of each prompt, left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((rows * len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i * rows:(i + 1) * rows, width - len(p):] = p
        mask[i * rows:(i + 1) * rows, width - len(p):] = 1
    return ids, mask


def left_padded_prompts(vocab: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max(lengths)] prompts of tokens in [2, vocab), left-padded with PAD, and their masks."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def pad_to(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), value)], dim=1)


# --------------------------------------------------------------------------------------------- process_logits
def test_process_logits_temperature_scales_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    torch.testing.assert_close(process_logits(logits, temperature=0.5), logits * 2.0)
    assert process_logits(logits.half()).dtype == torch.float32


def test_process_logits_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0],
                           [2.0, 2.0, 2.0, 0.0, 1.0]])
    out = process_logits(logits, top_k=2)
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [False, True, False, False, True]
    assert kept[1].tolist() == [True, True, True, False, False]  # a tie at the k-th value survives, as in HF
    torch.testing.assert_close(out[kept], logits[kept])
    assert torch.isfinite(process_logits(logits, top_k=0)).all()  # 0 = off
    assert torch.isfinite(process_logits(logits, top_k=99)).all()  # k ≥ V keeps everything


def test_process_logits_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05; mass strictly above each: 0, 0.5, 0.8, 0.95
    assert torch.isfinite(process_logits(logits, top_p=0.4)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(process_logits(logits, top_p=0.75)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(process_logits(logits, top_p=0.85)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(process_logits(logits, top_p=0.01)).sum() == 1  # the top token always survives
    # top-k runs first, and top-p then renormalises over the survivors: 0.5/0.8 = 0.625 < 0.7 → both kept
    assert torch.isfinite(process_logits(logits, top_k=2, top_p=0.7)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(process_logits(logits, top_k=2, top_p=0.6)).tolist() == [[False, True, False, False]]
    # ties at the nucleus boundary are all kept (0.4, 0.2, 0.2, 0.2: the mass above each 0.2 is 0.4, 0.6, 0.8)
    tied = torch.tensor([[0.2, 0.4, 0.2, 0.2]]).log()
    assert torch.isfinite(process_logits(tied, top_p=0.5)).tolist() == [[True, True, True, True]]
    assert torch.isfinite(process_logits(tied, top_p=0.3)).tolist() == [[False, True, False, False]]


def test_process_logits_matches_hf_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=g) * 3
    logits[:8, :10] = 1.25  # ties: top-k agrees on them; top-p with ties depends on HF's sort order
    for t, k, p in [(0.7, 0, 1.0), (1.0, 7, 1.0), (1.0, 0, 0.8), (1.3, 12, 0.9), (0.5, 3, 0.3)]:
        rows = slice(None) if p == 1.0 else slice(8, None)
        hf = logits[rows].clone()
        if t != 1.0:
            hf = TemperatureLogitsWarper(t)(None, hf)
        if k:
            hf = TopKLogitsWarper(k)(None, hf)
        if p < 1.0:
            hf = TopPLogitsWarper(p)(None, hf)
        ours = process_logits(logits[rows], t, k, p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(hf)), (t, k, p)
        torch.testing.assert_close(ours[torch.isfinite(ours)], hf[torch.isfinite(hf)])


def test_process_logits_rejects_bad_settings():
    x = torch.zeros(1, 4)
    for kwargs in [dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError, match="process_logits"):
            process_logits(x, **kwargs)


# --------------------------------------------------------------------------------------------- greedy = generate
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_alpha0_reproduces_generate(arch):
    vocab, new = 48, 10
    model = tiny_llama(vocab, seed=1) if arch == "llama" else tiny_gpt2(vocab, seed=1)
    ids, mask = left_padded_prompts(vocab, [3, 7, 5, 1], seed=2)

    def greedy_both(eos: int):
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1]:]
        out = mixed_sample(model, None, ids, mask, max_new_tokens=new, alpha=0.0, eos_token_id=eos,
                           pad_token_id=PAD, do_sample=False)
        return ref, out

    # first with an arbitrary EOS id, then with one the greedy text produces early in one row, so that rows
    # stop at different steps and the padding after EOS is compared as well
    ref, out = greedy_both(eos=vocab - 1)
    width = max(ref.shape[1], out.response_ids.shape[1])
    assert torch.equal(pad_to(out.response_ids, width, PAD), pad_to(ref, width, PAD))
    assert len(set(ref.flatten().tolist())) > 4  # the tiny model does not just repeat one token
    eos = int(ref[1, 3])
    ref, out = greedy_both(eos=eos)
    stopped = (ref == eos).any(dim=1)
    assert stopped.any() and out.response_mask.sum() < out.response_mask.numel()
    width = max(ref.shape[1], out.response_ids.shape[1])
    assert torch.equal(pad_to(out.response_ids, width, PAD), pad_to(ref, width, PAD))
    assert torch.equal(out.response_mask, teacher_mask(out.response_ids, eos))


def teacher_mask(response: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including the first EOS, by enumeration."""
    mask = torch.zeros(response.shape)
    for b in range(response.shape[0]):
        for t in range(response.shape[1]):
            mask[b, t] = 1.0
            if response[b, t] == eos:
                break
    return mask


# --------------------------------------------------------------------------------------------- determinism, teacher use
def test_sampling_is_deterministic_given_the_generator():
    vocab = 40
    model = tiny_llama(vocab, seed=4)
    ids, mask = left_padded_prompts(vocab, [2, 6, 4], seed=5)

    def draw(seed: int) -> SampleOutput:
        return mixed_sample(model, None, ids, mask, max_new_tokens=12, alpha=0.0, eos_token_id=EOS,
                            pad_token_id=PAD, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(11), draw(11), draw(12)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.student_logprobs, b.student_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)  # the generator, not a global seed, drives the draws
    assert a.teacher_logprobs is None
    torch.testing.assert_close(a.mixed_logprobs, a.student_logprobs, atol=0, rtol=0)


def test_padded_vocabulary_rows_are_never_drawn():
    """Models whose embedding matrix is padded past the tokenizer (Qwen2.5) must not draw the padded ids:
    with ``vocab_size`` both models' logits are cut first, and the log-probs are over the real entries only."""
    vocab, real = 20, 14
    student, teacher = tiny_llama(vocab, seed=6), tiny_llama(vocab, seed=7)
    for model in (student, teacher):
        with torch.no_grad():
            model.lm_head.weight[real:] = 0.0  # logit 0 on the padded rows: drawn often unless cut
    ids, mask = left_padded_prompts(real, [3, 4, 2, 5], seed=8)
    kw = dict(max_new_tokens=10, alpha=0.5, eos_token_id=EOS, pad_token_id=PAD)
    uncut = mixed_sample(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert (uncut.response_ids >= real).any()  # the hazard is real for these models
    out = mixed_sample(student, teacher, ids, mask, generator=torch.Generator().manual_seed(0), vocab_size=real, **kw)
    assert (out.response_ids < real).all()
    first = torch.log_softmax(student(input_ids=ids, attention_mask=mask,
                                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1, :real], -1)
    torch.testing.assert_close(out.student_logprobs[:, 0], first.gather(1, out.response_ids[:, :1]).squeeze(1))


def test_alpha_zero_never_runs_the_teacher():
    vocab = 20
    student, teacher = tiny_llama(vocab, seed=6), tiny_llama(vocab, seed=7)
    calls = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    ids, mask = left_padded_prompts(vocab, [3, 4], seed=8)
    out = mixed_sample(student, teacher, ids, mask, max_new_tokens=5, alpha=0.0, eos_token_id=EOS,
                       pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert calls == [] and out.teacher_logprobs is None
    mixed_sample(student, teacher, ids, mask, max_new_tokens=5, alpha=0.1, eos_token_id=EOS, pad_token_id=PAD)
    assert len(calls) >= 1


def test_input_errors_are_clear():
    student = tiny_llama(16, seed=0)
    ids, mask = left_padded_prompts(16, [2, 3], seed=0)
    with pytest.raises(ValueError, match="one shared vocabulary"):
        mixed_sample(student, tiny_gpt2(17, seed=0), ids, mask, max_new_tokens=2, alpha=0.5, eos_token_id=EOS,
                     pad_token_id=PAD)
    with pytest.raises(ValueError, match="needs a teacher"):
        mixed_sample(student, None, ids, mask, max_new_tokens=2, alpha=0.5, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="left-padded"):
        mixed_sample(student, None, ids.flip(1), mask.flip(1), max_new_tokens=2, alpha=0.0, eos_token_id=EOS,
                     pad_token_id=PAD)
    with pytest.raises(ValueError, match="alpha"):
        mixed_sample(student, student, ids, mask, max_new_tokens=2, alpha=1.5, eos_token_id=EOS, pad_token_id=PAD)


# --------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("alpha,temperature,top_k,top_p", [(0.3, 1.0, 0, 1.0), (0.6, 0.8, 9, 0.9), (1.0, 1.0, 0, 1.0)])
def test_logprobs_match_teacher_forcing_and_the_mixture(alpha, temperature, top_k, top_p):
    vocab = 32
    student = tiny_llama(vocab, seed=9)
    teacher = tiny_gpt2(vocab, seed=10, dropout=0.3)  # a different architecture, with dropout to switch off
    student.train()
    teacher.train()
    ids, mask = left_padded_prompts(vocab, [4, 1, 6, 3, 6], seed=11)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    out = mixed_sample(student, teacher, ids, mask, max_new_tokens=9, alpha=alpha, eos_token_id=[EOS, 2],
                       pad_token_id=PAD, generator=torch.Generator().manual_seed(12), **settings)
    assert student.training and teacher.training  # the previous modes come back
    assert all(m.training for m in teacher.modules())
    resp, rmask = out.response_ids, out.response_mask
    assert torch.equal(rmask, torch.minimum(teacher_mask(resp, EOS), teacher_mask(resp, 2)))
    assert out.response_ids.shape[1] <= 9
    # teacher forcing runs in eval mode, so any dropout left on in the loop would show up here
    s_ref = teacher_forced_logprobs(student, ids, mask, resp, rmask, **settings)
    t_ref = teacher_forced_logprobs(teacher, ids, mask, resp, rmask, **settings)
    assert student.training and teacher.training
    torch.testing.assert_close(out.student_logprobs, s_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.teacher_logprobs, t_ref, atol=1e-5, rtol=0)
    mixed = torch.log((1 - alpha) * out.student_logprobs.exp() + alpha * out.teacher_logprobs.exp())
    torch.testing.assert_close(out.mixed_logprobs, mixed * rmask, atol=1e-5, rtol=0)
    assert torch.isfinite(out.mixed_logprobs).all()
    assert (out.student_logprobs[rmask == 0] == 0).all() and (out.mixed_logprobs[rmask == 0] == 0).all()
    # a full-sequence forward of the unpadded prompt alone gives the same numbers (positions are right)
    row = 1
    n = int(mask[row].sum())
    alone = teacher_forced_logprobs(student, ids[row:row + 1, -n:], mask[row:row + 1, -n:], resp[row:row + 1],
                                    rmask[row:row + 1], **settings)
    torch.testing.assert_close(alone, s_ref[row:row + 1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- distribution
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of counts against probs (same length), with cells of expected
    count < 5 pooled (the smallest cells first, until the pool itself reaches 5). Zero-probability cells must be
    empty."""
    n = float(counts.sum())
    counts, expected = counts.double(), probs.double() * n
    impossible = probs <= 0
    assert counts[impossible].sum() == 0, "a token with zero probability under p̃ was drawn"
    counts, expected = counts[~impossible], expected[~impossible]
    order = torch.argsort(expected)
    counts, expected = counts[order], expected[order]
    cut = int((expected < 5).sum())
    if 0 < cut < len(expected) and expected[:cut].sum() < 5:
        cut += 1  # the pool itself must be large enough
    cut = min(cut, len(expected) - 1)  # keep two cells at least (only reached when testing a wrong distribution)
    if cut > 1:
        counts = torch.cat([counts[:cut].sum().view(1), counts[cut:]])
        expected = torch.cat([expected[:cut].sum().view(1), expected[cut:]])
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat, len(expected) - 1


def critical_value(df: int, p: float = 0.001) -> float:
    """Upper p-quantile of χ²(df): scipy when installed, else the Wilson–Hilferty approximation (p = 0.001)."""
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1.0 - p, df))
    except ImportError:
        assert p == 0.001
        z = 3.090232306167813  # the standard normal 0.999 quantile
        return df * (1.0 - 2.0 / (9.0 * df) + z * math.sqrt(2.0 / (9.0 * df))) ** 3


def exact_next_token(model, contexts: torch.Tensor, **settings) -> torch.Tensor:
    """[N, S] unpadded contexts → [N, V] processed next-token probabilities, from one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=contexts, attention_mask=torch.ones_like(contexts)).logits[:, -1]
    return torch.softmax(process_logits(logits, **settings), dim=-1)


DIST_VOCAB, DIST_ROWS = 10, 3000  # rows per prompt; two prompts of different lengths share the batch


@pytest.fixture(scope="module")
def dist_models():
    student = tiny_llama(DIST_VOCAB, seed=20, head_std=0.3)
    teacher = tiny_gpt2(DIST_VOCAB, seed=21, head_std=0.3)
    prompts = [torch.tensor([4, 7, 2, 9, 5]), torch.tensor([8, 3])]
    return student, teacher, prompts


@pytest.mark.parametrize("alpha,settings", [(0.0, {}), (0.2, {}), (0.7, {}), (1.0, {}),
                                            (0.5, dict(temperature=0.7, top_k=6, top_p=0.9))])
def test_mixed_sample_follows_p_tilde(dist_models, alpha, settings):
    student, teacher, prompts = dist_models
    vocab, rows = DIST_VOCAB, DIST_ROWS
    ids, mask = batch_of(prompts, rows)
    generator = torch.Generator().manual_seed(1000 + int(alpha * 10))
    out = mixed_sample(student, teacher if alpha > 0 else None, ids, mask, max_new_tokens=2, alpha=alpha,
                       eos_token_id=EOS, pad_token_id=PAD, generator=generator, **settings)
    assert out.response_ids.shape == (len(ids), 2)
    for i, p in enumerate(prompts):
        y = out.response_ids[i * rows:(i + 1) * rows]
        # exact p̃(y1) and p̃(y2 | y1) for every y1, from plain forwards of the unpadded prompt
        q1, p1 = exact_next_token(student, p[None], **settings)[0], exact_next_token(teacher, p[None], **settings)[0]
        contexts = torch.cat([p.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        q2, p2 = exact_next_token(student, contexts, **settings), exact_next_token(teacher, contexts, **settings)
        mix1, mix2 = (1 - alpha) * q1 + alpha * p1, (1 - alpha) * q2 + alpha * p2

        first = torch.bincount(y[:, 0], minlength=vocab)
        stat, df = chi_square(first, mix1)
        assert stat < critical_value(df), (alpha, i, stat, df)
        # the test has power: the draws reject the other model's distribution when they differ
        if alpha == 0.0:
            assert chi_square_or_impossible(first, p1) > 5 * critical_value(vocab - 1)
        if alpha == 1.0:
            assert chi_square_or_impossible(first, q1) > 5 * critical_value(vocab - 1)

        # joint (y1, y2): cells (y1, y2) for y1 ≠ EOS with p̃(y1)·p̃(y2|y1); after EOS the row is padded
        assert (y[y[:, 0] == EOS, 1] == PAD).all()
        joint = mix1[:, None] * mix2
        joint[EOS] = 0.0
        joint[EOS, PAD] = mix1[EOS]
        pair_counts = torch.bincount(y[:, 0] * vocab + y[:, 1], minlength=vocab * vocab)
        stat, df = chi_square(pair_counts, joint.flatten())
        assert df > 20  # enough cells survive pooling for the joint test to mean something
        assert stat < critical_value(df), (alpha, i, stat, df)


def chi_square_or_impossible(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The statistic against the wrong distribution; draws it calls impossible count as an infinite misfit."""
    if counts[probs <= 0].sum() > 0:
        return math.inf
    return chi_square(counts, probs)[0]


# --------------------------------------------------------------------------------------------- EOS handling
def bigram_llama(vocab: int, successor: dict[int, int]) -> LlamaForCausalLM:
    """A Llama whose next token is a fixed function of the current token.

    The attention and MLP outputs are zeroed, so the residual stream is the current token's one-hot embedding,
    and the LM head maps it to a +120 logit on the successor. That makes the successor certain in fp32.
    """
    hidden = 16
    model = tiny_llama(vocab, seed=0, hidden_size=hidden, intermediate_size=32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.lm_head.weight.zero_()
        for token, nxt in successor.items():
            model.lm_head.weight[nxt, token] = 30.0  # RMSNorm scales a one-hot by sqrt(hidden) = 4
    return model


def test_eos_stops_rows_and_pads_after():
    vocab = 12
    # A=2 → X=4 → EOS;  B=3 → Y=5 → Z=6 → EOS;  every other token → 7
    successor = {t: 7 for t in range(vocab)}
    successor.update({2: 4, 4: EOS, 3: 5, 5: 6, 6: EOS})
    model = bigram_llama(vocab, successor)
    gen = torch.Generator().manual_seed(0)

    ids_a = torch.tensor([[0, 0, 9, 2], [8, 9, 10, 2], [0, 0, 0, 2]])
    out = mixed_sample(model, None, ids_a, (ids_a != 0).long(), max_new_tokens=6, alpha=0.0, eos_token_id=EOS,
                       pad_token_id=PAD, generator=gen)
    assert out.response_ids.tolist() == [[4, EOS]] * 3  # every row done after 2 tokens: the loop stops early
    assert out.response_mask.sum(dim=1).tolist() == [2.0, 2.0, 2.0]

    ids = torch.tensor([[0, 0, 9, 2], [8, 9, 10, 3], [0, 0, 0, 2], [0, 11, 10, 3]])
    out = mixed_sample(model, model, ids, (ids != 0).long(), max_new_tokens=6, alpha=0.5, eos_token_id=EOS,
                       pad_token_id=PAD, generator=gen)
    assert out.response_ids.tolist() == [[4, EOS, PAD], [5, 6, EOS], [4, EOS, PAD], [5, 6, EOS]]
    assert out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    for lp in (out.student_logprobs, out.teacher_logprobs, out.mixed_logprobs):
        assert torch.isfinite(lp).all()
        assert (lp[out.response_mask == 0] == 0).all()
        assert lp.abs().max() < 1e-6  # certain tokens: log 1 = 0

    out = mixed_sample(model, None, ids, (ids != 0).long(), max_new_tokens=2, alpha=0.0, eos_token_id=EOS,
                       pad_token_id=PAD, generator=gen)
    assert out.response_ids.tolist() == [[4, EOS], [5, 6], [4, EOS], [5, 6]]  # max_new_tokens caps the length
    assert out.response_mask.sum().item() == 8


def test_sample_output_to_moves_every_field():
    model = tiny_llama(16, seed=0)
    ids, mask = left_padded_prompts(16, [2, 3], seed=0)
    out = mixed_sample(model, None, ids, mask, max_new_tokens=3, alpha=0.0, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.prompt_ids, ids) and torch.equal(out.prompt_mask, mask)
    moved = out.to("meta")
    assert moved.response_ids.device.type == "meta" and moved.teacher_logprobs is None
    assert moved.response_ids.shape == out.response_ids.shape


# --------------------------------------------------------------------------------------------- no autograd
def _output_tensors(out) -> dict[str, torch.Tensor]:
    from dataclasses import fields

    return {f.name: getattr(out, f.name) for f in fields(out) if isinstance(getattr(out, f.name), torch.Tensor)}


def test_every_sampling_and_scoring_entry_point_records_no_autograd():
    """Called with grad enabled on trainable models (a benchmark, a notebook), sampling and scoring must not record
    autograd: the naive loop's dynamic caches would otherwise keep every step's graph (memory ∝ length²). Only
    ``rollout.response_logits`` keeps grad on purpose (the learning phase differentiates through it)."""
    from minillm.generation.dispatch import ENGINES, sample_rollouts
    from minillm.generation.engine import fast_mixed_sample
    from minillm.generation.rollout import score_samples
    from minillm.generation.speculative import speculative_mixed_sample

    student, teacher = tiny_llama(16, seed=0).train(), tiny_gpt2(16, seed=1, head_std=0.5).train()
    assert all(p.requires_grad for p in student.parameters()) and torch.is_grad_enabled()
    ids, mask = left_padded_prompts(16, [2, 4, 3], seed=0)
    common = dict(max_new_tokens=5, alpha=0.5, eos_token_id=EOS, pad_token_id=PAD)
    outputs = {
        "mixed_sample": mixed_sample(student, teacher, ids, mask, **common),
        "mixed_sample greedy": mixed_sample(student, teacher, ids, mask, do_sample=False, **common),
        "fast_mixed_sample": fast_mixed_sample(student, teacher, ids, mask, **common),
        "speculative_mixed_sample": speculative_mixed_sample(student, teacher, ids, mask, **common),
    }
    for engine in ENGINES:
        outputs[f"sample_rollouts {engine}"] = sample_rollouts(engine, student, teacher, ids, mask, **common)
    tensors = {f"{name}.{field}": t for name, out in outputs.items() for field, t in _output_tensors(out).items()}
    sample = outputs["mixed_sample"]
    tensors["teacher_forced_logprobs"] = teacher_forced_logprobs(student, ids, mask, sample.response_ids,
                                                                 sample.response_mask)
    scored = score_samples(student=student, teacher=teacher, prompt_ids=ids, prompt_mask=mask,
                           response_ids=sample.response_ids, response_mask=sample.response_mask,
                           prompt_index=torch.arange(3), alpha=0.5, temperature=1.0, reward_scale=1.0,
                           reward_clip=10.0, gamma=1.0, length_norm=True, include_current=True)
    tensors.update({f"score_samples.{field}": t for field, t in _output_tensors(scored).items()})
    recorded = sorted(name for name, t in tensors.items() if t.requires_grad or t.grad_fn is not None)
    assert not recorded, f"these outputs carry autograd history: {recorded}"
    assert student.training and teacher.training  # modes restored
