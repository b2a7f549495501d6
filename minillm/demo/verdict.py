"""The demo's verdict: what the student can and cannot do, stated from measured numbers only.

Two kinds of evidence go in:

- the scored protocol (T = 1 samples, minillm-eval): teacher log-likelihood of each model's own samples, the
  reverse-KL estimate k3 and Rouge-L;
- the greedy answers (:mod:`minillm.demo.greedy`), judged by a simple criterion a reader can check by hand. A
  student's greedy answer is **readable** when it is

  * non-repetitive: at most ``REPEAT_LIMIT`` of its word trigrams repeat an earlier trigram of the same answer
    (degenerate loops such as "the the the ..." score near 1; an answer under three words scores 0), and
  * on topic: its Rouge-L F-measure against the teacher's greedy answer to the same prompt is at least
    ``OVERLAP_MIN`` (×100, the paper's scale), i.e. it shares a real part of the teacher's wording;
  * and not empty.

The criterion is deliberately crude: it cannot tell a correct answer from a fluent wrong one, and it rewards
paraphrase poorly; the report says so next to the numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

REPEAT_LIMIT = 0.2
OVERLAP_MIN = 20.0
STUDENTS = ("sft", "minillm")


def repeated_trigram_fraction(text: str) -> float:
    """Share of an answer's word trigrams (lower-cased, whitespace words) that already occurred in it."""
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def judge_greedy(answers: dict[str, Sequence[str]]) -> dict[str, Any]:
    """Per-prompt scores and counts of the greedy answers of ``teacher``, ``sft`` and ``minillm``.

    Returns ``{"per_prompt": {model: [{"rougeL_vs_teacher", "repeated", "non_repetitive", "on_topic",
    "readable"}, ...]}, "counts": {model: {"non_repetitive", "on_topic", "readable", "empty", "num"}}}``; the teacher's
    own answers are only checked for repetition (their overlap with themselves is 100 by construction).
    """
    from ..evaluation.metrics import per_example_rouge_l

    teacher = list(answers["teacher"])
    per_prompt: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, texts in answers.items():
        texts = list(texts)
        if len(texts) != len(teacher):
            raise ValueError(f"greedy answers of `{name}`: {len(texts)} answers for {len(teacher)} prompts")
        overlap = per_example_rouge_l(texts, teacher) if name != "teacher" else [100.0] * len(texts)
        rows = []
        for text, rouge in zip(texts, overlap):
            repeated = repeated_trigram_fraction(text)
            non_rep = bool(text.strip()) and repeated <= REPEAT_LIMIT
            on_topic = rouge >= OVERLAP_MIN
            rows.append({"rougeL_vs_teacher": rouge, "repeated": repeated, "non_repetitive": non_rep,
                         "on_topic": on_topic, "readable": non_rep and on_topic})
        per_prompt[name] = rows
        counts[name] = {k: sum(r[k] for r in rows) for k in ("non_repetitive", "on_topic", "readable")}
        counts[name]["empty"] = sum(not text.strip() for text in texts)
        counts[name]["num"] = len(rows)
    return {"per_prompt": per_prompt, "counts": counts, "repeat_limit": REPEAT_LIMIT, "overlap_min": OVERLAP_MIN}


def best_first(judged: dict[str, Any]) -> list[int]:
    """Prompt positions, best-answered by the MiniLLM student first: readable answers first, then by Rouge-L
    of its greedy answer against the teacher's (higher first), then by less repetition, then by position."""
    rows = judged["per_prompt"]["minillm"]
    return sorted(range(len(rows)), key=lambda i: (not rows[i]["readable"], -rows[i]["rougeL_vs_teacher"],
                                                   rows[i]["repeated"], i))


def _closer(mini: float | None, sft: float | None, higher_is_better: bool) -> bool | None:
    if mini is None or sft is None:
        return None
    return mini > sft if higher_is_better else mini < sft


def verdict_text(models: dict[str, dict[str, Any]], judged: dict[str, Any], best_instruction: str | None,
                 keep_layers: int, teacher_layers: int, repetition_penalty: float = 1.0) -> str:
    """One paragraph from the numbers: size, the scored T = 1 comparison, the greedy criterion, can / cannot."""
    t, s, m = models["teacher"], models["sft"], models["minillm"]
    c = judged["counts"]
    n = c["minillm"]["num"]
    share = 100.0 * m["parameters"] / t["parameters"]
    parts = [f"The students keep {keep_layers} of the teacher's {teacher_layers} layers: "
             f"{m['parameters'] / 1e6:.1f} M parameters, {share:.0f} % of the teacher's."]
    lp = _closer(m.get("teacher_logprob"), s.get("teacher_logprob"), True)
    kl = _closer(m.get("reverse_kl_k3"), s.get("reverse_kl_k3"), False)
    if lp is not None:
        gap = t["teacher_logprob"] - m["teacher_logprob"]
        parts.append(
            f"On the scored protocol (T = 1 samples) the MiniLLM student's samples get {m['teacher_logprob']:.2f} "
            f"nats/token under the teacher against {s['teacher_logprob']:.2f} for the SFT student "
            f"({'better' if lp else 'worse'}) and {t['teacher_logprob']:.2f} for the teacher's own samples "
            f"({gap:.2f} nats/token short of it)"
            + (f"; its reverse-KL estimate k3 is {m['reverse_kl_k3']:.2f} against {s['reverse_kl_k3']:.2f} "
               f"({'better' if kl else 'worse'})" if kl is not None else "")
            + f"; Rouge-L against the teacher's answers {m['rougeL']:.1f} vs {s['rougeL']:.1f} "
            f"(teacher vs itself: {t['rougeL']:.1f}).")
    decoding = "" if repetition_penalty == 1.0 else \
        f"with repetition penalty {repetition_penalty:g} on tokens already seen, for all three models; "
    parts.append(
        f"Greedy answers ({decoding}criterion: at most {REPEAT_LIMIT:.0%} repeated word trigrams and Rouge-L ≥ "
        f"{OVERLAP_MIN:.0f} against the teacher's greedy answer; it checks form and overlap, not correctness): "
        f"{c['minillm']['readable']} of {n} MiniLLM "
        f"answers meet it ({c['minillm']['non_repetitive']} non-repetitive, {c['minillm']['on_topic']} on "
        f"topic), against {c['sft']['readable']} of {n} for the SFT student; the teacher's own greedy answers "
        f"are non-repetitive on {c['teacher']['non_repetitive']} of {n}.")
    readable = c["minillm"]["readable"]
    if readable and best_instruction:
        parts.append(f"What it can do: answer {readable} of the {n} held-out prompts in a way that follows the "
                     f"teacher's wording, best “{_short(best_instruction)}”.")
    else:
        parts.append("What it can do: none of its greedy answers meets the criterion in this run, so the "
                     "distillation shows in the measured numbers only, not in readable text.")
    missing = n - readable
    if missing:
        empty = c["minillm"]["empty"]
        parts.append(f"What it cannot do: the other {missing} prompt(s) get answers that are empty ({empty}), "
                     f"repeat themselves ({n - c['minillm']['non_repetitive'] - empty}) or drift from the "
                     f"teacher's answer ({n - c['minillm']['on_topic']}).")
    return " ".join(parts)


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rstrip() + " …"
