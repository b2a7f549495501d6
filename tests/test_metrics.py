"""Rouge-L, exact match and Dist-n against hand-computed values (DESIGN §6, lmops-notes §5 "Metric")."""

import subprocess
import sys

import pytest

from minillm.evaluation import distinct_n, exact_match, normalize_answer, per_example_rouge_l, rouge_l
from minillm.evaluation import metrics as metrics_module


# ----------------------------------------------------------------------------------------- Rouge-L
def test_identical_strings_score_100():
    assert rouge_l(["the sky is blue"], ["the sky is blue"]) == pytest.approx(100.0)


def test_stemming_matches_inflected_forms():
    # Porter stems tokens longer than 3 chars: running -> run, dogs -> dog; "run"/"dog" stay as they are.
    assert rouge_l(["running dogs"], ["run dog"]) == pytest.approx(100.0)
    # "runs" -> "run" as well, but "ran" is irregular and is not stemmed to "run": 1 of 2 tokens match.
    # LCS = 1 ("dog"), P = 1/2, R = 1/2, F = 1/2.
    assert rouge_l(["ran dogs"], ["run dog"]) == pytest.approx(50.0)


def test_case_and_punctuation_are_ignored():
    assert rouge_l(["Hello, World!"], ["hello world"]) == pytest.approx(100.0)
    assert rouge_l(["PARIS."], ["paris"]) == pytest.approx(100.0)


def test_empty_or_punctuation_only_prediction_scores_zero():
    assert per_example_rouge_l(["", "!!!", "paris"], ["paris", "paris", "paris"]) == pytest.approx([0.0, 0.0, 100.0])
    assert rouge_l([""], [""]) == 0.0  # rouge_score gives 0 when either side has no tokens


def test_partial_lcs_by_hand():
    # prediction tokens: the cat sat on the mat  (6)
    # reference tokens:  a cat on a mat          (5)
    # LCS = "cat on mat" = 3 -> precision = 3/6 = 0.5, recall = 3/5 = 0.6,
    # F = 2PR / (P + R) = 2 * 0.30 / 1.10 = 6/11 = 0.545454...
    assert rouge_l(["the cat sat on the mat"], ["a cat on a mat"]) == pytest.approx(100 * 6 / 11)


def test_max_over_references_and_mean_over_examples():
    # Example 1 vs "green grass": no common token -> 0.
    #           vs "the sky is blue": pred [blue, sky], ref [the, sky, is, blue]; the order differs, so
    #           LCS = 1, P = 1/2, R = 1/4, F = 2 * (1/8) / (3/4) = 1/3.  The max is 1/3.
    # Example 2 is identical to its only reference -> 1.
    per_example = per_example_rouge_l(["blue sky", "seven"], [["green grass", "the sky is blue"], ["seven"]])
    assert per_example == pytest.approx([100 / 3, 100.0])
    assert rouge_l(["blue sky", "seven"], [["green grass", "the sky is blue"], "seven"]) == pytest.approx(
        (100 / 3 + 100) / 2)
    # The order of the references does not matter.
    assert rouge_l(["blue sky"], [["the sky is blue", "green grass"]]) == pytest.approx(100 / 3)


def test_scorer_is_built_once():
    rouge_l(["a"], ["a"])
    assert metrics_module._rouge_l_scorer() is metrics_module._rouge_l_scorer()
    assert metrics_module._rouge_l_scorer.cache_info().currsize == 1


@pytest.mark.parametrize("metric", [rouge_l, exact_match, per_example_rouge_l])
def test_bad_inputs_raise(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty set"):
        metric([], [])
    with pytest.raises(ValueError, match="example 1 has an empty list of references"):
        metric(["a", "b"], ["a", []])
    with pytest.raises(TypeError, match="not a single string"):
        metric("abc", ["a", "b", "c"])
    with pytest.raises(TypeError, match="prediction 0"):
        metric([None], ["a"])


# ----------------------------------------------------------------------------------------- exact match
def test_normalize_answer():
    assert normalize_answer("  The  Cat,\tsat!\n") == "the cat sat"
    assert normalize_answer("Don't") == "dont"          # the apostrophe is punctuation
    assert normalize_answer("a b") == "a b"             # articles are kept


def test_exact_match_normalisation():
    assert exact_match(["The Cat!"], ["the cat"]) == 100.0                 # case + punctuation
    assert exact_match([" Paris.  "], ["paris"]) == 100.0                  # surrounding whitespace
    assert exact_match(["a  quick\tfox"], ["a quick fox"]) == 100.0        # inner whitespace collapsed
    assert exact_match(["cat"], ["the cat"]) == 0.0                        # articles are NOT removed
    assert exact_match(["an apple"], ["apple"]) == 0.0
    assert exact_match(["7"], ["7."]) == 100.0
    assert exact_match(["seven"], ["7"]) == 0.0


def test_exact_match_max_over_references_and_mean():
    # 1: matches the second reference; 2: matches nothing; 3: matches; 4: matches nothing -> 2/4 = 50.
    preds = ["Paris", "Lyon", "blue", "the sky"]
    refs = [["London", "paris."], ["Paris"], "Blue!", ["sky"]]
    assert exact_match(preds, refs) == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------- Dist-n
def test_distinct_n_by_hand():
    texts = ["a b c a b c", "a b c"]
    # bigrams: text 1: ab bc ca ab bc (5), text 2: ab bc (2) -> 7 in all, 3 distinct {ab, bc, ca}.
    assert distinct_n(texts, n=2) == pytest.approx(100 * 3 / 7)
    # 4-grams: text 1: abca bcab cabc (3, all distinct), text 2 has only 3 tokens -> 3/3.
    assert distinct_n(texts, n=4) == pytest.approx(100.0)
    # unigrams: 9 tokens, 3 distinct.
    assert distinct_n(texts, n=1) == pytest.approx(100 * 3 / 9)
    # the default is Dist-4: two identical 4-token texts -> 2 four-grams, 1 distinct.
    assert distinct_n(["w x y z", "w x y z"]) == pytest.approx(50.0)


def test_distinct_n_does_not_span_texts_and_handles_no_ngrams():
    assert distinct_n(["a b", "c d"], n=3) == 0.0   # "b c d" would cross the boundary between texts
    assert distinct_n([], n=2) == 0.0
    assert distinct_n(["", "   "], n=1) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a"], n=0)


def test_package_import_is_light():
    """`import minillm.evaluation` must not pull in torch, transformers or rouge_score."""
    code = ("import sys, minillm.evaluation; "
            "heavy = [m for m in ('torch', 'transformers', 'rouge_score', 'deepspeed') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
