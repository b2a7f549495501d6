"""The paper's Table 1 Rouge-L numbers, for printing beside ours (:mod:`minillm.evaluation.table1`).

Source: Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024,
arXiv:2306.08543 v6, Table 1 (p. 7), the R-L columns (mean over 5 seeds). The rows below are the ones quoted verbatim
in secondary transcriptions of that PDF (collected in the project's reference notes on LMOps, "Reported numbers").

What could not be recovered as text is ``None`` and prints as "–": the GPT-2 340M and 760M rows, every KD row, the
GPT-2 1.5B and OPT-13B teacher rows, and the R-L cells the transcriptions give only as GPT-4 scores (SeqKD beyond
Dolly, OPT-1.3B beyond Dolly, the LLaMA-13B teacher's middle columns). Do not fill them from memory or from plots:
copy them from the PDF, with the page, if you need them.
"""

from __future__ import annotations

from typing import Optional

SOURCE = ("MiniLLM (Gu et al., ICLR 2024), arXiv:2306.08543 v6, Table 1, Rouge-L, mean over 5 seeds; "
          "\"–\" = not recovered from the paper as text")

# The evaluation sets in Table 1's column order: (set name in minillm-eval's results.json, column title).
PAPER_SETS = (("dolly", "Dolly"), ("self_inst", "SelfInst"), ("vicuna", "Vicuna"), ("sinst", "S-NI"),
              ("uinst", "UnNI"))

# Recipe (config) stem -> the model as Table 1 names it.
MODEL_LABELS = {
    "gpt2-base": "GPT-2 120M", "gpt2-medium": "GPT-2 340M", "gpt2-large": "GPT-2 760M", "gpt2-xl": "GPT-2 1.5B",
    "opt-1.3b": "OPT-1.3B", "opt-2.7b": "OPT-2.7B", "opt-6.7b": "OPT-6.7B", "opt-13b": "OPT-13B",
    "llama-7b": "LLaMA-7B", "llama-13b": "LLaMA-13B",
}

_ = None  # not recovered (module docstring)
# Recipe stem -> Table 1 method -> Rouge-L per PAPER_SETS column. Teachers are keyed by the teacher's stem.
ROUGE_L: dict[str, dict[str, tuple[Optional[float], ...]]] = {
    "gpt2-base": {
        "SFT w/o KD": (23.3, 10.0, 14.7, 16.3, 18.5),
        "SeqKD": (22.7, _, _, _, _),
        "MiniLLM": (24.6, 13.2, 16.9, 25.3, 26.6),
    },
    "opt-1.3b": {
        "SeqKD": (26.1, _, _, _, _),
        "MiniLLM": (26.7, _, _, _, _),
    },
    "llama-7b": {
        "SFT w/o KD": (26.3, 20.8, 17.5, 32.4, 35.8),
        "SeqKD": (27.5, _, _, _, _),
        "MiniLLM": (29.0, 23.2, 20.7, 35.5, 40.2),
    },
    "llama-13b": {
        "Teacher": (29.7, _, _, _, 38.5),
    },
}


def paper_rouge_l(stem: Optional[str], method: str) -> tuple[Optional[float], ...]:
    """The paper's Rouge-L row for the recipe ``stem`` and ``method`` (all None where the paper's row is unknown)."""
    return ROUGE_L.get(stem or "", {}).get(method, (None,) * len(PAPER_SETS))
