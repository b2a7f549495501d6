"""The paper's analyses as ``minillm-eval`` options: LLM-judge feedback score, exposure bias, LM loss,
calibration. The maths lives in :mod:`minillm.evaluation.analysis` and :mod:`minillm.evaluation.judge`; this
module feeds them the evaluation samples and data.

- ``--judge``: each seed's samples are scored against the first reference by an OpenAI-compatible judge
  (:class:`~minillm.evaluation.judge.JudgeClient`: base URL, model and key from the environment; the key is
  never logged). Per seed metric ``judge`` = 100 · Σ model scores / Σ reference scores; mean/std over seeds
  like every other metric. The judge sees the record's instruction (+ input), or its prompt.
- ``--exposure-bias`` (with ``--teacher``): ExAccErr (Arora et al. 2022, MiniLLM §3.3) from the model's
  samples at the first seed (free run) and the teacher's samples on the same prompts at that seed (oracle).
  The whole curve goes to ``analyses.json``; the summary ``ex_acc_err`` is its value at ``ex_acc_err_at``, the
  longest prefix length at which at least 10% of both sample sets are still running.
- ``--lm-loss``: teacher-forced token-mean cross-entropy (nats) of the first reference given the full prompt,
  tokenised like the SFT data, sequences cut to max_prompt_length + max_new_tokens.
- ``--calibration sst2|boolq``: ECE and accuracy of the option the model finds most likely (10 equal-width
  bins). The prompt is the task phrased as an instruction in the ``--template`` (reference template by
  default), the options are the answer words. Data: ``--calibration-data`` (a local ``.json``/``.jsonl`` file
  or a hub id) or the default hub id (``stanfordnlp/sst2`` / ``google/boolq``, validation split).

Under several ranks the analyses run on every rank over the whole set (identical results; required under
ZeRO-3, where every forward is collective) except the exposure-bias forwards, which run on each rank's own
shard and are gathered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..data.records import DataError, Record, hub_unreachable_error, read_json_objects
from ..data.templates import render_prompt
from .settings import EvalSettings

# Fraction of the sample sets that must still be running at the reported ExAccErr length.
EXPOSURE_MIN_FRACTION = 0.1

CALIBRATION_TASKS: dict[str, dict[str, Any]] = {
    "sst2": {
        "hub_id": "stanfordnlp/sst2", "split": "validation", "options": ["negative", "positive"],
        "instruction": "Is the sentiment of the following sentence positive or negative? Answer with one word.",
    },
    "boolq": {
        "hub_id": "google/boolq", "split": "validation", "options": ["no", "yes"],
        "instruction": "Read the passage and answer the question with yes or no.",
    },
}


# ============================================================================================ judge
def make_judge():
    """A :class:`JudgeClient` from the environment (fails before any model is loaded when the key is missing)."""
    from .judge import JudgeClient

    return JudgeClient()


def judge_samples(judge, eval_set, result: dict[str, Any], workers: int) -> None:
    """Add ``judge`` (feedback score ×100) and its details to one seed's result, in place."""
    samples = result["samples"]
    # Samples are in prompt-position order; map them back to their records for the full question.
    record_index = eval_set.prompts.indices
    questions = [eval_set.questions[record_index[p]] for p in range(len(samples))]
    references = [s["references"][0] for s in samples]
    report = judge.feedback_score(questions, references, [s["output"] for s in samples], workers=workers)
    result["judge"] = report["score"]
    result["judge_detail"] = {k: report[k] for k in ("n", "failed", "total", "reference_mean", "model_mean",
                                                      "errors")}
    for sample, pair in zip(samples, report["scores"]):
        sample["judge_scores"] = pair  # [reference score, model score] or None


# ============================================================================================ teacher
def check_teacher(model, teacher, tokenizer, teacher_tok) -> None:
    """The teacher must share the model's vocabulary (its log-probs are read at the model's token ids)."""
    from ..models import check_compatibility

    check_compatibility(model, teacher, tokenizer, teacher_tok)


# ============================================================================================ per-set analyses
def set_analyses(model, tokenizer, teacher, eval_set, batches, settings: EvalSettings, ctx) -> dict[str, Any]:
    """The seed-independent analyses of one model on one set (rank 0 gets the numbers, others {})."""
    out: dict[str, Any] = {}
    if settings.lm_loss:
        from .analysis import reference_lm_loss

        refs = [r.references[0] for r in eval_set.records]
        out["lm_loss"] = reference_lm_loss(model, tokenizer, eval_set.prompt_texts, refs,
                                           batch_size=settings.batch_size,
                                           max_length=settings.max_prompt_length + settings.max_new_tokens)
    if settings.exposure_bias and teacher is not None:
        curve = exposure_bias_for_set(model, teacher, tokenizer, eval_set, batches, settings, ctx)
        if curve is not None:
            out.update(curve)
    return out if ctx.is_main else {}


def _kl_rows(model, teacher, tokenizer, batches, ctx, vocab: int) -> list[list[float]]:
    from ..losses import response_mask
    from .analysis import response_forward_kl
    from .runner import eos_ids

    rows = []
    for b in batches:
        mask = response_mask(b.response_ids, eos_ids(tokenizer))
        kl = response_forward_kl(model, teacher, b.input_ids, b.attention_mask, b.response_ids, mask,
                                 batch_size=len(b.texts), vocab_size=vocab)
        for r in range(len(b.texts)):
            rows.append(kl[r, : int(mask[r].sum())].tolist())
    return rows


def _table(rows: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    kl = torch.zeros((len(rows), width), dtype=torch.float64)
    mask = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        kl[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = 1
    return kl, mask


def exposure_bias_for_set(model, teacher, tokenizer, eval_set, batches, settings: EvalSettings, ctx
                          ) -> Optional[dict[str, Any]]:
    """ExAccErr of ``model`` vs ``teacher`` on this set (module docstring); None on ranks other than 0."""
    from .analysis import exposure_bias_curve
    from .runner import gather_by_position, generate_for_set

    seed = settings.seeds[0]
    oracle_batches = generate_for_set(teacher, tokenizer, eval_set, seed, settings, ctx,
                                      desc=f"teacher/{eval_set.name}/seed{seed}")
    vocab = len(tokenizer)
    merged = {}
    for name, got in (("free", batches), ("oracle", oracle_batches)):
        positions = [int(p) for b in got for p in b.index.tolist()]
        merged[name] = gather_by_position(ctx, positions, _kl_rows(model, teacher, tokenizer, got, ctx, vocab))
    if not ctx.is_main:
        return None
    kl_free, mask_free = _table([merged["free"][p] for p in sorted(merged["free"])])
    kl_oracle, mask_oracle = _table([merged["oracle"][p] for p in sorted(merged["oracle"])])
    curve = exposure_bias_curve(kl_free, mask_free, kl_oracle, mask_oracle)
    enough = ((curve["n_free"] >= EXPOSURE_MIN_FRACTION * kl_free.shape[0])
              & (curve["n_oracle"] >= EXPOSURE_MIN_FRACTION * kl_oracle.shape[0])
              & torch.isfinite(curve["ex_acc_err"]))
    at = int(enough.nonzero().max()) if bool(enough.any()) else None
    return {
        "ex_acc_err": float(curve["ex_acc_err"][at]) if at is not None else None,
        "ex_acc_err_at": at + 1 if at is not None else None,
        "exposure_bias_curve": {k: [float(x) for x in v.tolist()] for k, v in curve.items()},
    }


# ============================================================================================ calibration
def _label(value: Any, options: list[str], where: str, key: str) -> int:
    if isinstance(value, bool):
        return int(value)  # BoolQ's `answer`: True = yes (option 1)
    if isinstance(value, int) and 0 <= value < len(options):
        return value
    if isinstance(value, str) and value.strip().lower() in options:
        return options.index(value.strip().lower())
    raise DataError(f"{where}: field `{key}` must be one of {options} (or its index), got {value!r}")


def _calibration_example(task: str, row: dict[str, Any], where: str) -> tuple[Record, int]:
    spec = CALIBRATION_TASKS[task]

    def need(*keys: str) -> tuple[str, Any]:
        for key in keys:
            if key in row and row[key] is not None:
                return key, row[key]
        raise DataError(f"{where}: missing field `{keys[0]}`" + (f" (or {', '.join(keys[1:])})" if keys[1:] else ""))

    if task == "sst2":
        _, sentence = need("sentence", "text")
        key, label = need("label")
        return Record(instruction=spec["instruction"], input=str(sentence).strip()), _label(label, spec["options"],
                                                                                           where, key)
    _, question = need("question")
    _, passage = need("passage")
    key, label = need("answer", "label")
    question = str(question).strip()
    question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?") if question else question
    return (Record(instruction=f"{spec['instruction']}\n\nQuestion: {question}", input=str(passage).strip()),
            _label(label, spec["options"], where, key))


def load_calibration_rows(task: str, source: Optional[str]) -> list[tuple[dict[str, Any], str]]:
    """(row, where) pairs from a local file or a hub dataset (its validation split)."""
    spec = CALIBRATION_TASKS[task]
    source = source or spec["hub_id"]
    path = Path(source).expanduser()
    if path.is_file():
        return [(obj, f"{path}:{line}") for line, obj in read_json_objects(path)]
    if source.endswith((".json", ".jsonl")) or path.is_dir():
        raise DataError(f"--calibration-data `{source}`: expected a .json/.jsonl file with "
                        f"{'sentence, label' if task == 'sst2' else 'question, passage, answer'} fields")
    try:
        import datasets

        rows = datasets.load_dataset(source, split=spec["split"])
    except Exception as e:
        raise hub_unreachable_error(source, e, f"{spec['split']}.jsonl") from e
    return [(dict(row), f"{source}[{spec['split']}]:{i + 1}") for i, row in enumerate(rows)]


def calibration(model, tokenizer, settings: EvalSettings, ctx) -> dict[str, Any]:
    """ECE report of one model (see :func:`minillm.evaluation.analysis.calibration_report`)."""
    from .analysis import calibration_report

    task = settings.calibration
    rows = load_calibration_rows(task, settings.calibration_data)
    if 0 <= settings.calibration_num < len(rows):
        rows = rows[: settings.calibration_num]
    if not rows:
        raise DataError(f"calibration data for {task} holds no rows")
    examples = [_calibration_example(task, row, where) for row, where in rows]
    prompts = [render_prompt(record, tokenizer, settings.template) for record, _ in examples]
    options = CALIBRATION_TASKS[task]["options"]
    report = calibration_report(model, tokenizer, prompts, options, [label for _, label in examples],
                                batch_size=settings.batch_size)
    report.update({"task": task, "options": options, "source": settings.calibration_data or
                   CALIBRATION_TASKS[task]["hub_id"]})
    return report
