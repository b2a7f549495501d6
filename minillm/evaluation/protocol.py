"""The whole ``minillm-eval`` run: every model on every set at every seed, the analyses, the output files.

:func:`run_eval` sits above :mod:`minillm.evaluation.runner` (sets, generation, per-seed metrics) and
:mod:`minillm.evaluation.extras` (the paper's analyses), which both stay importable without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import extras
from .runner import (SEED_METRICS, aggregate, evaluate_seed, format_table, load_eval_set, load_frozen, model_names,
                     read_eval_records, set_names, settings_record, setup_context, write_json)
from .settings import EvalSettings

@dataclass
class EvalOutcome:
    """What :func:`run_eval` returns (on rank 0; other ranks get the same object with empty results)."""

    results: dict[str, Any] = field(default_factory=dict)
    table: str = ""
    out_dir: Optional[Path] = None


def run_eval(settings: EvalSettings, log=print) -> EvalOutcome:
    """Evaluate every model on every set at every seed and write the outputs of the CLI contract.

    ``OUT/<model>/<set>/seed<k>.json``, ``OUT/results.json``, ``OUT/table.md`` (Rouge-L) and
    ``OUT/table_all.md`` (every metric), plus the analyses' files (see :mod:`minillm.evaluation.extras`).
    """
    settings.check()
    out = Path(settings.out)
    names = model_names(settings.model, settings.name)
    sets = set_names(settings.data)
    judge = extras.make_judge() if settings.judge else None  # fails before any model is loaded
    records = {source: read_eval_records(source, settings) for source in settings.data}  # so does bad data
    ctx = setup_context(settings)
    ok = False
    try:
        teacher = teacher_tok = None
        if settings.teacher:
            teacher, teacher_tok = load_frozen(settings.teacher, settings, ctx)
        results: dict[str, Any] = {}
        calibration: dict[str, Any] = {}
        data_stats: dict[str, Any] = {}
        for path, model_name in zip(settings.model, names):
            model, tokenizer = load_frozen(path, settings, ctx)
            if teacher is not None:
                extras.check_teacher(model, teacher, tokenizer, teacher_tok)
            results[model_name] = {}
            for source, set_name in zip(settings.data, sets):
                eval_set = load_eval_set(source, set_name, tokenizer, settings, records[source])
                data_stats[set_name] = str(eval_set.stats)
                if ctx.is_main:
                    log(f"[minillm-eval] {model_name} on {set_name}: {len(eval_set.prompts)} prompts "
                        f"({eval_set.stats.truncated} cut to {settings.max_prompt_length} tokens)")
                per_seed: dict[str, dict[str, float]] = {}
                first_batches = None
                for seed in settings.seeds:
                    result, batches = evaluate_seed(model, tokenizer, eval_set, seed, settings, ctx, teacher,
                                                    desc=f"{model_name}/{set_name}/seed{seed}")
                    first_batches = first_batches if first_batches is not None else batches
                    if ctx.is_main:
                        if judge is not None:
                            extras.judge_samples(judge, eval_set, result, settings.judge_workers)
                        write_json(out / model_name / set_name / f"seed{seed}.json", result)
                        per_seed[str(seed)] = {k: result[k] for k in SEED_METRICS if k in result}
                        log(f"[minillm-eval]   seed {seed}: " + ", ".join(
                            f"{k} {v:.4g}" for k, v in per_seed[str(seed)].items()))
                extra = extras.set_analyses(model, tokenizer, teacher, eval_set, first_batches, settings, ctx)
                if ctx.is_main:
                    results[model_name][set_name] = aggregate(per_seed)
                    if extra:
                        results[model_name][set_name]["analyses"] = extra
                        write_json(out / model_name / set_name / "analyses.json", extra)
                        log("[minillm-eval]   analyses: " + ", ".join(
                            f"{k} {v:.4g}" for k, v in extra.items() if isinstance(v, (int, float))))
            if settings.calibration:
                report = extras.calibration(model, tokenizer, settings, ctx)
                if ctx.is_main:
                    calibration[model_name] = report
                    write_json(out / model_name / f"calibration_{settings.calibration}.json", report)
                    log(f"[minillm-eval] {model_name} calibration on {settings.calibration}: "
                        f"ECE {report['ece']:.4f}, accuracy {report['accuracy']:.4f} (n={report['n']})")
            del model
        outcome = EvalOutcome(out_dir=out)
        if ctx.is_main:
            body: dict[str, Any] = {"settings": settings_record(settings, names, sets, ctx, data_stats),
                                    "results": results}
            if calibration:
                body["calibration"] = calibration
            write_json(out / "results.json", body)
            outcome.results = body
            outcome.table = format_table(results, names, sets)
            (out / "table.md").write_text(outcome.table)
            every = [f"## {m}\n\n" + format_table(results, names, sets, m, 4) for m in SEED_METRICS
                     if any(m in e.get("mean", {}) for r in results.values() for e in r.values())]
            (out / "table_all.md").write_text("\n".join(every))
        ctx.barrier()
        ok = True
        return outcome
    finally:
        ctx.cleanup(ok)
