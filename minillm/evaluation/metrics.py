"""Text metrics of the evaluation protocol (DESIGN §6): Rouge-L, exact match and Dist-n.

Rouge-L and exact match follow the official evaluation code (lmops-notes §5 "Metric"):

- Rouge-L is the F-measure of ``rouge_score``'s ``rougeL`` (LCS over the whole sequence, not ``rougeLsum``)
  with the Porter stemmer. Its tokenizer lowercases, turns every run of characters outside ``[a-z0-9]``
  into a space and stems tokens longer than three characters; an empty side scores 0.
- Exact match compares SQuAD-style normalised strings: lowercase, punctuation (``string.punctuation``)
  removed, whitespace collapsed. Unlike SQuAD, articles are **kept**: the reference code defines the
  article-removal step but never calls it, and we reproduce its numbers.

Each example may have several references; its score is the maximum over them, and the reported number
is the mean over examples ×100. One deliberate difference: the reference silently truncates predictions
and references to the shorter list, which hides off-by-one bugs in evaluation loops, so we raise instead.

Only the standard library is imported at module level; ``rouge_score`` is imported on first use.
"""

from __future__ import annotations

import functools
import string
from typing import Callable, Sequence, Union

Reference = Union[str, Sequence[str]]

_PUNCTUATION = frozenset(string.punctuation)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    """One shared scorer: building it loads the stemmer, which is too slow to repeat per call."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_pairs(predictions: Sequence[str], references: Sequence[Reference]) -> list[list[str]]:
    """Validate the two lists and return each example's references as a non-empty list of strings."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per example), not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "there must be exactly one reference entry (a string or a list of strings) per prediction")
    if len(predictions) == 0:
        raise ValueError("no predictions to score: the metric of an empty set is undefined")
    refs: list[list[str]] = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} is a {type(pred).__name__}, expected str")
        group = [ref] if isinstance(ref, str) else list(ref)
        if not group:
            raise ValueError(f"example {i} has an empty list of references; give at least one reference string")
        for ref_text in group:
            if not isinstance(ref_text, str):
                raise TypeError(f"a reference of example {i} is a {type(ref_text).__name__}, expected str")
        refs.append(group)
    return refs


def _per_example(predictions: Sequence[str], references: Sequence[Reference],
                 score: Callable[[str, str], float]) -> list[float]:
    """Max over each example's references of ``score(prediction, reference)``, ×100."""
    refs = _check_pairs(predictions, references)
    return [100.0 * max(score(pred, ref) for ref in group) for pred, group in zip(predictions, refs)]


def _rouge_l_f(prediction: str, reference: str) -> float:
    return _rouge_l_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def per_example_rouge_l(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """Rouge-L F-measure ×100 of each prediction against the best of its references."""
    return _per_example(predictions, references, _rouge_l_f)


def rouge_l(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean over examples of the max-over-references Rouge-L F-measure, ×100 (the paper's R-L)."""
    scores = per_example_rouge_l(predictions, references)
    return sum(scores) / len(scores)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ``string.punctuation`` characters, collapse whitespace; articles are kept."""
    no_punct = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(no_punct.split())


def _exact(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Percentage of predictions equal to one of their references after :func:`normalize_answer`."""
    scores = _per_example(predictions, references, _exact)
    return sum(scores) / len(scores)


def distinct_n(texts: Sequence[str], n: int = 4) -> float:
    """Dist-n ×100: distinct n-grams / all n-grams, pooled over every text (whitespace tokens).

    n-grams never span two texts. Returns 0.0 when no text has ``n`` tokens (nothing to count).
    """
    if isinstance(texts, str):
        raise TypeError("distinct_n expects a list of texts, not a single string")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = text.split()
        for start in range(len(tokens) - n + 1):
            seen.add(tuple(tokens[start:start + n]))
            total += 1
    return 100.0 * len(seen) / total if total else 0.0
