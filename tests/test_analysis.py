"""Calibration (ECE), exposure bias (ExAccErr) and reference LM loss: hand-computed values and unbatched oracles."""

import math

import pytest
import torch

from minillm.evaluation.analysis import (
    calibration_bins,
    calibration_report,
    choice_confidences,
    expected_calibration_error,
    exposure_bias,
    exposure_bias_curve,
    per_position_forward_kl,
    reference_lm_loss,
    response_forward_kl,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny-model calls: see conftest.py


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # needs no files; id = byte + 3, EOS = 1, pad = 0, 384 ids


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256,
                         initializer_range=0.5)  # sharp, position-sensitive outputs, so that offsets would show
    return LlamaForCausalLM(config).eval()


def _tiny_gpt2(seed: int):
    # Absolute position embeddings: unlike RoPE, a left-padding position shift changes the outputs.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def student():
    return _tiny_llama(1)


@pytest.fixture(scope="module")
def teacher():
    return _tiny_llama(2)


def _byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def _logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """[len−1] float64 log q(ids[t+1] | ids[≤t]) from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------- ECE
def test_ece_hand_computed_six_predictions_three_bins():
    conf = [0.2, 0.3, 0.5, 0.6, 0.9, 1.0]
    correct = [False, True, True, False, True, True]
    # Bins [0, 1/3), [1/3, 2/3), [2/3, 1]:
    #   bin 0: {0.2 ✗, 0.3 ✓}  acc 0.5, conf 0.25 → |0.5 − 0.25| = 0.25
    #   bin 1: {0.5 ✓, 0.6 ✗}  acc 0.5, conf 0.55 → 0.05
    #   bin 2: {0.9 ✓, 1.0 ✓}  acc 1.0, conf 0.95 → 0.05   (1.0 lands in the last bin)
    # ECE = 2/6·0.25 + 2/6·0.05 + 2/6·0.05 = 0.35/3 = 0.11666…
    assert expected_calibration_error(conf, correct, n_bins=3) == pytest.approx(0.35 / 3, abs=1e-12)
    table = calibration_bins(conf, correct, n_bins=3)
    assert [row["count"] for row in table] == [2, 2, 2]
    assert [row["accuracy"] for row in table] == pytest.approx([0.5, 0.5, 1.0])
    assert [row["confidence"] for row in table] == pytest.approx([0.25, 0.55, 0.95])
    assert table[2]["lower"] == pytest.approx(2 / 3) and table[2]["upper"] == pytest.approx(1.0)


def test_ece_perfect_calibration_is_zero_and_empty_bins_are_none():
    # conf 0.75 with 3 of 4 right, conf 0.25 with 1 of 4 right: every bin's accuracy equals its confidence.
    conf = torch.tensor([0.75] * 4 + [0.25] * 4)
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    table = calibration_bins(conf, correct)
    assert sum(r["count"] for r in table) == 8
    assert table[0]["count"] == 0 and table[0]["accuracy"] is None and table[0]["confidence"] is None


def test_ece_edges_one_and_zero():
    table = calibration_bins([1.0, 0.0], [False, True], n_bins=10)
    assert table[9]["count"] == 1 and table[0]["count"] == 1
    # |0 − 1.0|·1/2 + |1 − 0.0|·1/2 = 1
    assert expected_calibration_error([1.0, 0.0], [False, True]) == pytest.approx(1.0)
    assert expected_calibration_error([1.0], [True]) == 0.0


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="2 confidences but 1"):
        expected_calibration_error([0.5, 0.5], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError, match="no predictions"):
        expected_calibration_error([], [])


# ----------------------------------------------------------------------------------------------- ExAccErr
def test_exaccerr_constant_kl_has_no_excess_error():
    c, L = 0.3, 6
    kl = torch.full((3, L), c)
    mask = torch.ones(3, L)
    out = exposure_bias_curve(kl, mask, kl.clone()[:2], mask[:2])
    steps = torch.arange(1, L + 1, dtype=torch.float64)
    torch.testing.assert_close(out["l"], steps)
    torch.testing.assert_close(out["R"], steps * c)
    torch.testing.assert_close(out["eps"], torch.full((L,), c, dtype=torch.float64))
    torch.testing.assert_close(out["ex_acc_err"], torch.zeros(L, dtype=torch.float64), atol=1e-9, rtol=0)


def test_exaccerr_linear_free_kl_matches_closed_form_and_masks_are_respected():
    a, c, L = 0.1, 0.2, 5
    t = torch.arange(1, L + 1, dtype=torch.float64)
    # Free run: KL_t = a·t. Row 1 agrees up to t = 3 and carries garbage on its masked tail.
    kl_free = torch.stack([a * t, torch.cat([a * t[:3], torch.tensor([99.0, -7.0], dtype=torch.float64)])])
    mask_free = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    kl_oracle = torch.full((1, L), c, dtype=torch.float64)
    out = exposure_bias_curve(kl_free, mask_free, kl_oracle, torch.ones(1, L))
    # R(l) = a·l(l+1)/2, l·ε(l) = c·l  →  ExAccErr(l) = (a(l+1)/(2c) − 1)·100
    torch.testing.assert_close(out["R"], a * t * (t + 1) / 2)
    torch.testing.assert_close(out["ex_acc_err"], (a * (t + 1) / (2 * c) - 1) * 100)
    torch.testing.assert_close(out["n_free"], torch.tensor([2, 2, 2, 1, 1], dtype=torch.float64))
    # l = 1: (0.1·2/0.4 − 1)·100 = −50; l = 5: (0.1·6/0.4 − 1)·100 = 50
    assert out["ex_acc_err"][0].item() == pytest.approx(-50.0)
    assert out["ex_acc_err"][4].item() == pytest.approx(50.0)


def test_exaccerr_empty_positions_contribute_zero_and_zero_oracle_is_nan():
    kl_free = torch.tensor([[1.0, 2.0, 5.0]])
    mask_free = torch.tensor([[True, True, False]])  # nobody valid at t = 3
    kl_oracle = torch.tensor([[0.0, 1.0]])  # shorter table: t = 3 has no oracle sequence either
    out = exposure_bias_curve(kl_free, mask_free, kl_oracle, torch.ones(1, 2))
    torch.testing.assert_close(out["R"], torch.tensor([1.0, 3.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(out["eps"], torch.tensor([0.0, 0.5, 1 / 3], dtype=torch.float64))
    assert math.isnan(out["ex_acc_err"][0].item())  # l·ε(1) = 0
    assert out["ex_acc_err"][1].item() == pytest.approx(200.0)  # (3 − 1)/1·100
    assert out["ex_acc_err"][2].item() == pytest.approx(200.0)
    assert out["n_oracle"].tolist() == [1.0, 1.0, 0.0]


def test_per_position_forward_kl_matches_direct_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7) * 2
    got = per_position_forward_kl(s, t)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    want = (p * (p.log() - q.log())).sum(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_position_forward_kl(s, s.clone()), torch.zeros(2, 3), atol=1e-6, rtol=0)
    # Masked positions are exactly 0 even when their logits are NaN; a teacher −inf entry adds nothing.
    s2, t2 = s.clone(), t.clone()
    s2[1, 2] = float("nan")
    t2[0, 0, 0] = float("-inf")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = per_position_forward_kl(s2, t2, mask)
    assert out[1, 2].item() == 0.0 and torch.isfinite(out).all()
    p0, q0 = torch.softmax(t2[0, 0].double(), -1), torch.softmax(s2[0, 0].double(), -1)
    assert out[0, 0].item() == pytest.approx(float((p0[1:] * (p0[1:].log() - q0[1:].log())).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        per_position_forward_kl(s, t[..., :6])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exposure_bias_model_helper_matches_unpadded_forwards(family, student, teacher):
    if family == "gpt2":
        student, teacher = _tiny_gpt2(1), _tiny_gpt2(2)
    torch.manual_seed(3)
    # Left-padded prompts (lengths 3, 1, 2 in width 3) and responses of 4 columns with valid lengths 4, 2, 3.
    prompt_ids = torch.tensor([[10, 11, 12], [0, 0, 13], [0, 14, 15]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    response_ids = torch.randint(3, 300, (3, 4))
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    kl = response_forward_kl(student, teacher, prompt_ids, prompt_mask, response_ids, response_mask, batch_size=2)
    for n in range(3):
        prompt = prompt_ids[n][prompt_mask[n] > 0].tolist()
        length = int(response_mask[n].sum())
        ids = torch.tensor([prompt + response_ids[n, :length].tolist()])
        with torch.no_grad():
            q = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)[len(prompt) - 1: -1]
            p = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)[len(prompt) - 1: -1]
        want = (p.exp() * (p - q)).sum(-1)
        torch.testing.assert_close(kl[n, :length].double(), want, atol=1e-5, rtol=1e-4)
        assert (kl[n, length:] == 0).all()
    assert (kl[response_mask > 0] > 0).all()  # different random models: every valid KL is positive

    free = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask}
    oracle = {**free, "response_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])}
    out = exposure_bias(student, teacher, free, oracle, batch_size=2)  # same batching as `kl`: bitwise-equal
    want = exposure_bias_curve(kl, response_mask, out["kl_oracle"], oracle["response_mask"])
    for key in ("R", "eps", "ex_acc_err"):
        torch.testing.assert_close(out[key], want[key])
    torch.testing.assert_close(out["kl_free"], kl)
    with pytest.raises(ValueError, match="lacks `response_mask`"):
        exposure_bias(student, teacher, {k: v for k, v in free.items() if k != "response_mask"}, oracle)


# ----------------------------------------------------------------------------------------------- choices
PROMPTS = ["Review: great film. Sentiment:", "Is it ok? Answer:", "x", "Bad, boring and long. Sentiment:", "ok"]
OPTIONS = [" neg", " pos", " n/a"]  # equal lengths keep the probabilities away from 0 and 1


def test_choice_confidences_batched_equals_one_at_a_time(student, tokenizer):
    probs = choice_confidences(student, tokenizer, PROMPTS, OPTIONS, batch_size=3)  # pairs split across batches
    assert probs.shape == (5, 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    for i, prompt in enumerate(PROMPTS):
        scores = []
        for option in OPTIONS:
            lp = _logprobs_of(student, _byte_ids(prompt + option))
            scores.append(lp[len(_byte_ids(prompt)) - 1:].sum())
        torch.testing.assert_close(probs[i].double(), torch.softmax(torch.stack(scores), -1), atol=1e-5, rtol=1e-4)
    assert student.training is False
    student.train()
    torch.testing.assert_close(choice_confidences(student, tokenizer, PROMPTS, OPTIONS, batch_size=10), probs,
                               atol=1e-5, rtol=1e-4)
    assert student.training is True  # flag restored
    student.eval()


def test_choice_confidences_rejects_bad_input(student, tokenizer):
    with pytest.raises(ValueError, match="at least two options"):
        choice_confidences(student, tokenizer, PROMPTS, ["yes"])
    with pytest.raises(ValueError, match="prompt 1 tokenises to nothing"):
        choice_confidences(student, tokenizer, ["a", ""], OPTIONS)


def test_calibration_report_agrees_with_its_parts(student, tokenizer):
    labels = [1, 0, 2, 0, 1]
    report = calibration_report(student, tokenizer, PROMPTS, OPTIONS, labels, n_bins=5)
    assert 0 < report["ece"] < 1
    probs = choice_confidences(student, tokenizer, PROMPTS, OPTIONS)
    correct = probs.argmax(-1) == torch.tensor(labels)
    assert report["n"] == 5
    assert report["accuracy"] == pytest.approx(correct.double().mean().item())
    assert report["ece"] == pytest.approx(expected_calibration_error(probs.max(-1).values, correct, 5), abs=1e-6)
    assert sum(row["count"] for row in report["bins"]) == 5 and len(report["bins"]) == 5
    by_name = calibration_report(student, tokenizer, PROMPTS, OPTIONS, [OPTIONS[k] for k in labels], n_bins=5)
    assert by_name["ece"] == pytest.approx(report["ece"]) and by_name["accuracy"] == report["accuracy"]
    with pytest.raises(ValueError, match="not one of the options"):
        calibration_report(student, tokenizer, PROMPTS, OPTIONS, ["maybe"] * 5)


# ----------------------------------------------------------------------------------------------- LM loss
def test_reference_lm_loss_equals_manual_token_mean(student, tokenizer):
    prompts = ["Q: 2+2? A:", "Name a colour.", "Hi", "Long prompt here"]
    refs = [" 4", " Blue is one.", " hello there", " cut off by max_length"]
    max_length = 22
    total, count = 0.0, 0
    for prompt, ref in zip(prompts, refs):
        p = _byte_ids(prompt)
        seq = (p + _byte_ids(ref) + [tokenizer.eos_token_id])[:max_length]  # bytes never merge: full = p + r
        lp = _logprobs_of(student, seq)
        total -= float(lp[len(p) - 1:].sum())
        count += len(seq) - len(p)
    assert count == 3 + 8 + 13 + 6  # max_length 22 keeps 8 of 14 and 6 of 23 response tokens (prompts 14, 16)
    got = reference_lm_loss(student, tokenizer, prompts, refs, batch_size=3, max_length=max_length)
    assert got == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="no example has a response token"):
        reference_lm_loss(student, tokenizer, ["abc"], [" d"], max_length=3)
