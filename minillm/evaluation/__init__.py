"""Evaluation: text metrics (Rouge-L, exact match, Dist-n) and response generation (DESIGN §6).

This ``__init__`` stays light: it must not import torch or transformers, so that scoring text (and
``minillm-eval --help``) costs no framework import. Generation lives in :mod:`minillm.evaluation.generation`.
"""

from .metrics import distinct_n, exact_match, normalize_answer, per_example_rouge_l, rouge_l

__all__ = ["distinct_n", "exact_match", "normalize_answer", "per_example_rouge_l", "rouge_l"]
