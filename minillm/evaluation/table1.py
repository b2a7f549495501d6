"""Table 1 of the paper for one student: our Rouge-L (mean ± std over seeds) beside the paper's, in its layout.

    python -m minillm.evaluation.table1 --runs runs/pipeline-gpt2 --student gpt2-base --teacher gpt2-xl

reads every ``RUNS/eval*/results.json`` that ``scripts/pipeline.sh`` wrote (``eval/`` when a command ran every
row, ``eval-<rows>/`` when it ran some), and writes ``RUNS/table1.md``. Rows are Table 1's methods (teacher, SFT w/o
KD, KD, SeqKD, MiniLLM, found under the pipeline's ``--name`` values teacher/SFT/KD/SeqKD/MiniLLM); columns are the
five evaluation sets, then any other set the results hold. Each cell is "paper / ours mean ± std", with "–" where a
number is missing. When one row was evaluated more than once (a later single-row command re-ran it), the most
recently written results.json wins, and the header names which file every row came from and how it was evaluated.

Only the standard library is imported: this runs after a GPU job without loading torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from .paper_numbers import MODEL_LABELS, PAPER_SETS, SOURCE, paper_rouge_l

# (name given to minillm-eval by scripts/pipeline.sh, Table 1's method name); "teacher" is the teacher's row.
ROWS = (("teacher", "Teacher"), ("SFT", "SFT w/o KD"), ("KD", "KD"), ("SeqKD", "SeqKD"), ("MiniLLM", "MiniLLM"))
METRIC = "rougeL"


class TableError(UserError, ValueError):
    """No or unreadable evaluation results."""


def find_results(runs: Path) -> list[Path]:
    """``runs/eval*/results.json``, oldest first (so that later files override earlier ones)."""
    return sorted(runs.glob("eval*/results.json"), key=lambda p: (p.stat().st_mtime_ns, str(p)))


def merge_results(files: Sequence[Path]) -> tuple[dict[str, dict[str, Any]], dict[str, Path], dict[Path, Any]]:
    """(model → set → aggregate entry, model → the file it came from, file → its settings block); a model found in
    several files is taken whole from the last one."""
    merged: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    settings: dict[Path, Any] = {}
    for path in files:
        try:
            body = json.loads(Path(path).read_text(encoding="utf-8"))
            results = body["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TableError(f"{path}: not a minillm-eval results.json ({type(e).__name__}: {e})") from None
        settings[Path(path)] = body.get("settings", {})
        for model, per_set in results.items():
            merged[model] = per_set
            origin[model] = Path(path)
    return merged, origin, settings


def _ours(entry: Optional[dict[str, Any]]) -> str:
    if not entry or METRIC not in entry.get("mean", {}):
        return "–"
    return f"{entry['mean'][METRIC]:.2f} ± {entry['std'][METRIC]:.2f}"


def cell(paper: Optional[float], entry: Optional[dict[str, Any]]) -> str:
    """"paper / ours mean ± std", each "–" when missing."""
    return f"{'–' if paper is None else f'{paper:.1f}'} / ours {_ours(entry)}"


def _label(stem: Optional[str], fallback: str) -> str:
    return MODEL_LABELS.get(stem or "", stem or fallback)


def _describe(settings: dict[str, Any]) -> str:
    seeds = " ".join(str(s) for s in settings.get("seeds", [])) or "?"
    preset = settings.get("preset") or "none (the defaults)"
    return f"preset {preset}, seeds {seeds}, dtype {settings.get('dtype', '?')}"


def build_table(merged: dict[str, dict[str, Any]], *, student: Optional[str] = None, teacher: Optional[str] = None,
                origin: Optional[dict[str, Path]] = None, settings: Optional[dict[Path, Any]] = None,
                note: Optional[str] = None, base: Optional[Path] = None) -> str:
    """The markdown text of Table 1 for ``student`` (recipe stem) distilled from ``teacher``."""
    names = [name for name, _ in ROWS]
    extra = [s for m in names for s in merged.get(m, {}) if s not in dict(PAPER_SETS)]
    extra = list(dict.fromkeys(extra))
    titles = [title for _, title in PAPER_SETS] + extra
    student_label, teacher_label = _label(student, "student"), _label(teacher, "teacher")
    lines = [f"# Table 1: {student_label} distilled from {teacher_label}", "",
             "Rouge-L, each cell \"paper / ours\", ours = mean ± std (population) over the evaluation seeds.",
             f"Paper: {SOURCE}."]
    if origin:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name in origin:
                by_file.setdefault(origin[name], []).append(name)
        for path, models in by_file.items():
            shown = path.relative_to(base) if base and path.is_relative_to(base) else path
            lines.append(f"Ours ({', '.join(models)}): {shown}, {_describe((settings or {}).get(path, {}))}.")
    if note:
        lines.append(note)
    lines += ["", "| Model | Method | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for name, method in ROWS:
        stem = teacher if name == "teacher" else student
        paper = list(paper_rouge_l(stem, method)) + [None] * len(extra)
        per_set = merged.get(name, {})
        cells = [cell(p, per_set.get(s)) for p, s in zip(paper, [s for s, _ in PAPER_SETS] + extra)]
        label = teacher_label if name == "teacher" else student_label
        lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.evaluation.table1", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, metavar="DIR", help="the pipeline's runs folder (reads DIR/eval*/results.json)")
    p.add_argument("--results", nargs="+", metavar="FILE", help="these results.json files instead, later ones winning")
    p.add_argument("--student", metavar="STEM", help="the student's recipe stem (gpt2-base, opt-1.3b, llama-7b, ...)")
    p.add_argument("--teacher", metavar="STEM", help="the teacher's recipe stem (gpt2-xl, opt-13b, llama-13b)")
    p.add_argument("--out", metavar="FILE", help="default RUNS/table1.md")
    p.add_argument("--note", help="a line printed under the header")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    files = [Path(f) for f in args.results] if args.results else find_results(runs)
    if not files:
        raise SystemExit(f"table1: no results.json under {runs}/eval*/: run the evaluation first "
                         "(scripts/pipeline.sh runs it after training)")
    try:
        merged, origin, settings = merge_results(files)
    except TableError as e:
        raise SystemExit(f"table1: {e}") from None
    text = build_table(merged, student=args.student, teacher=args.teacher, origin=origin, settings=settings,
                       note=args.note, base=runs)
    out = Path(args.out) if args.out else runs / "table1.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
