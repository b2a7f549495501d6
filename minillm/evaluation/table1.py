"""Table 1 of the paper for one model family: our Rouge-L (mean ± std over seeds) beside the paper's, in its layout.

    python -m minillm.evaluation.table1 --runs runs/pipeline-gpt2 --teacher gpt2-xl

reads what ``scripts/pipeline.sh`` wrote: ``RUNS/STUDENT/eval*/results.json`` for every student size it ran
(``eval/`` when a command ran every row, ``eval-<rows>/`` when it ran some), and writes ``RUNS/table1.md``. Rows
are Table 1's: the teacher, then SFT w/o KD, KD, SeqKD and MiniLLM for each student size (smallest first), found
under the pipeline's ``--name`` values teacher/SFT/KD/SeqKD/MiniLLM. Columns are the five evaluation sets, then any
other set the results hold. Each cell is "paper / ours mean ± std", with "–" where a number is missing. When a row
was evaluated more than once (a later single-row command re-ran it), the most recently written results.json wins;
the header names the file every row came from and how it was evaluated.

Only the standard library is imported: this runs after a GPU job without loading torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import UserError
from .paper_numbers import MODEL_LABELS, PAPER_SETS, SOURCE, paper_rouge_l

# (name given to minillm-eval by scripts/pipeline.sh, Table 1's method name); "teacher" is the teacher's row.
ROWS = (("teacher", "Teacher"), ("SFT", "SFT w/o KD"), ("KD", "KD"), ("SeqKD", "SeqKD"), ("MiniLLM", "MiniLLM"))
METRIC = "rougeL"


class TableError(UserError, ValueError):
    """No or unreadable evaluation results."""


def find_results(folder: Path) -> list[Path]:
    """``folder/eval*/results.json``, oldest first (so that later files override earlier ones)."""
    return sorted(folder.glob("eval*/results.json"), key=lambda p: (p.stat().st_mtime_ns, str(p)))


def find_students(runs: Path) -> list[str]:
    """The student folders of ``runs`` that hold evaluation results, in Table 1's order (known recipe stems by
    size, then the others by name)."""
    found = [d.name for d in runs.iterdir() if d.is_dir() and find_results(d)] if runs.is_dir() else []
    order = list(MODEL_LABELS)
    return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))


@dataclass
class Section:
    """One student size: model name → set → aggregate entry, and the file each model came from."""

    student: str
    merged: dict[str, dict[str, Any]] = field(default_factory=dict)
    origin: dict[str, Path] = field(default_factory=dict)


def read_results(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(body.get("results"), dict):
            raise KeyError("results")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise TableError(f"{path}: not a minillm-eval results.json ({type(e).__name__}: {e})") from None
    return body


def load_section(student: str, files: Sequence[Path], bodies: dict[Path, Any]) -> Section:
    """The rows of ``files`` (oldest first); a model found in several files is taken whole from the last one."""
    section = Section(student)
    for path in files:
        bodies.setdefault(path, read_results(path))
        for model, per_set in bodies[path]["results"].items():
            section.merged[model] = per_set
            section.origin[model] = path
    return section


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


def build_table(sections: Sequence[Section], bodies: dict[Path, Any], *, teacher: Optional[str] = None,
                note: Optional[str] = None, base: Optional[Path] = None) -> str:
    """The markdown text of Table 1: the teacher's row (from the newest file that has one), then each section's
    student rows."""
    names = [name for name, _ in ROWS]
    known = dict(PAPER_SETS)
    extra = list(dict.fromkeys(s for sec in sections for m in names for s in sec.merged.get(m, {}) if s not in known))
    sets = [s for s, _ in PAPER_SETS] + extra
    titles = [title for _, title in PAPER_SETS] + extra
    with_teacher = [sec for sec in sections if "teacher" in sec.merged]
    top = max(with_teacher, key=lambda sec: (sec.origin["teacher"].stat().st_mtime_ns, str(sec.origin["teacher"])),
              default=None)
    teacher_label = _label(teacher, "teacher")
    students = ", ".join(_label(sec.student, "student") for sec in sections) or "no student evaluated yet"
    lines = [f"# Table 1: {students} distilled from {teacher_label}", "",
             "Rouge-L, each cell \"paper / ours\", ours = mean ± std (population) over the evaluation seeds.",
             f"Paper: {SOURCE}."]
    used: dict[Path, list[str]] = {}
    if top is not None:
        used.setdefault(top.origin["teacher"], []).append("teacher")
    for sec in sections:
        for name in names[1:]:
            if name in sec.origin:
                used.setdefault(sec.origin[name], []).append(name)
    for path, models in used.items():
        shown = path.relative_to(base) if base and path.is_relative_to(base) else path
        lines.append(f"Ours ({', '.join(models)}): {shown}, {_describe(bodies[path].get('settings', {}))}.")
    if note:
        lines.append(note)
    lines += ["", "| Model | Method | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]

    def row(label: str, stem: Optional[str], method: str, per_set: dict[str, Any]) -> str:
        paper = list(paper_rouge_l(stem, method)) + [None] * len(extra)
        return f"| {label} | {method} | " + " | ".join(cell(p, per_set.get(s)) for p, s in zip(paper, sets)) + " |"

    lines.append(row(teacher_label, teacher, "Teacher", top.merged["teacher"] if top else {}))
    for sec in sections:
        for name, method in ROWS[1:]:
            lines.append(row(_label(sec.student, "student"), sec.student, method, sec.merged.get(name, {})))
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.evaluation.table1", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, metavar="DIR",
                   help="the pipeline's runs folder (reads DIR/STUDENT/eval*/results.json)")
    p.add_argument("--student", nargs="+", metavar="STEM",
                   help="only these student folders (default: every one with results), e.g. gpt2-base")
    p.add_argument("--teacher", metavar="STEM", help="the teacher's recipe stem (gpt2-xl, opt-13b, llama-13b)")
    p.add_argument("--out", metavar="FILE", help="default RUNS/table1.md")
    p.add_argument("--note", help="a line printed under the header")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    students = args.student or find_students(runs)
    files = {s: find_results(runs / s) for s in students}
    if not any(files.values()):
        raise SystemExit(f"table1: no results.json under {runs}/{'|'.join(students) or '*'}/eval*/: run the "
                         "evaluation first (scripts/pipeline.sh runs it after training)")
    bodies: dict[Path, Any] = {}
    try:
        sections = [load_section(s, files[s], bodies) for s in students]
    except TableError as e:
        raise SystemExit(f"table1: {e}") from None
    text = build_table(sections, bodies, teacher=args.teacher, note=args.note, base=runs)
    out = Path(args.out) if args.out else runs / "table1.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
