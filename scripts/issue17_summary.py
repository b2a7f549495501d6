"""Issue 17's targets checked against minillm-bench JSON files (what `gpu_check.sh bench17` ends with).

    python scripts/issue17_summary.py --gpt2 G.json --phase P.json --opt O.json --walls walls.txt

Any file may be missing (a step that timed out): its targets are reported as "not measured". ``walls.txt`` has
lines "NAME SECONDS RC" from the script (item 5: each preset under 300 s). Exit status 0 whatever the numbers:
this reports, the issue decides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def _fast_variant(rollout: dict) -> str | None:
    """The engine variant the targets are about: CUDA graphs where it ran, else the eager one (CPU checks)."""
    return next((k for k in ("fast_cuda_graphs", "fast_eager") if k in rollout), None)


def _check(label: str, value: float | None, target: str, ok: bool | None) -> str:
    shown = "not measured" if value is None else f"{value:.3f}"
    verdict = "-" if ok is None else ("MET" if ok else "MISSED")
    return f"  {label:<56} {shown:>12}  target {target:<8} {verdict}"


def rollout_lines(name: str, result: dict | None, max_seconds: float | None, min_vs_naive: float,
                  min_vs_hf: float) -> list[str]:
    from minillm.bench.breakdown import format_breakdown

    lines = [f"{name}:"]
    rollout = (result or {}).get("phases", {}).get("rollout")
    if not rollout:
        return lines + ["  not measured (no JSON: see the step's log)"]
    variant = _fast_variant(rollout)
    entry = rollout[variant]
    secs = entry["seconds"]
    vs_naive = rollout.get("speedup_vs_naive", {}).get(variant)
    vs_hf = rollout["speedup_vs_hf_generate_student_only"][variant]
    lines.append(f"  variant {variant}; device {result['device']['name']}; dtype {result['dtype']}")
    if max_seconds is not None:
        lines.append(_check("rollout seconds", secs, f"<= {max_seconds}", secs <= max_seconds))
    lines.append(_check("speed-up vs naive loop", vs_naive, f">= {min_vs_naive}",
                        None if vs_naive is None else vs_naive >= min_vs_naive))
    lines.append(_check("speed-up vs HF generate of the student alone", vs_hf, f">= {min_vs_hf}", vs_hf >= min_vs_hf))
    if "breakdown" in entry:
        compile_info = entry["breakdown"]["compile"]
        warm = compile_info["warmup"]["compile_seconds"]
        lines.append(_check("compile + capture seconds in the warm-up call (item 3)", warm, "<= 20", warm <= 20))
        again = compile_info["timed_runs"]["compiles"] + compile_info["timed_runs"]["captures"]
        lines.append(_check("compiles + captures in the timed calls (item 3)", again, "== 0", again == 0))
        lines.append(format_breakdown(variant, entry["breakdown"]))
    return lines


def phase_lines(result: dict | None) -> list[str]:
    lines = ["measured phase (item 4):"]
    measured = (result or {}).get("phases", {}).get("phase_measured")
    if not measured:
        return lines + ["  not measured (no JSON: see the step's log)"]
    speedup = measured.get("speedup_vs_naive", {}).get("fast")
    lines.append(_check("phase speed-up fast vs naive", speedup, ">= 3", None if speedup is None else speedup >= 3))
    for name, entry in measured["variants"].items():
        extra = entry.get("compile", {}).get("phase", {})
        lines.append(f"  {name}: {entry['seconds']:.2f} s (rollout {entry.get('rollout_seconds', 0):.2f}, score "
                     f"{entry.get('score_seconds', 0):.2f}, learn {entry.get('learn_seconds', 0):.2f}); compiles/"
                     f"captures during the phase {extra.get('compiles')}/{extra.get('captures')}")
    return lines


def wall_lines(path: str | None) -> list[str]:
    lines = ["wall time per step (item 5: each preset under 300 s):"]
    if not path or not Path(path).is_file():
        return lines + ["  no record"]
    for row in Path(path).read_text().split("\n"):
        if row.strip():
            name, seconds, rc = row.split()
            state = {"0": "finished", "124": "TIMED OUT", "137": "KILLED (timeout)"}.get(rc, f"FAILED rc={rc}")
            ok = rc == "0" and float(seconds) < 300
            lines.append(f"  {name:<16} {float(seconds):8.1f} s  {state:<18} {'MET' if ok else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpt2")
    p.add_argument("--opt")
    p.add_argument("--phase")
    p.add_argument("--walls")
    args = p.parse_args(argv)
    lines = rollout_lines("gpt2 preset rollout (items 1, 6)", _load(args.gpt2), 0.8, 12, 2.4)
    lines += rollout_lines("opt-1.3b-13b preset rollout (item 2)", _load(args.opt), None, 10, 1.0)
    lines += phase_lines(_load(args.phase)) + wall_lines(args.walls)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
