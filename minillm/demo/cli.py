"""Command line of the demo: ``python -m minillm.demo [--quick | --profile NAME | --assets tiny]``.

    python -m minillm.demo                   # full: ~15 min on 2 CPU cores, output in runs/demo
    python -m minillm.demo --quick           # 1.5-2.5 min, output in runs/demo-quick
    python -m minillm.demo --assets tiny     # the committed tiny test models, no GGUF (~30 s), runs/demo-tiny

A second run reuses everything whose settings did not change (converted teacher, teacher answers, finished
training runs); --force reruns every stage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def make_parser() -> argparse.ArgumentParser:
    from .profiles import PROFILES

    p = argparse.ArgumentParser(prog="python -m minillm.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="run size (default full)")
    p.add_argument("--quick", action="store_true", help="same as --profile quick")
    p.add_argument("--assets", choices=["smollm2", "tiny"], default=None,
                   help="tiny: the committed test assets instead of SmolLM2 (same as --profile tiny)")
    p.add_argument("--out", default=None, help="output folder (default: the profile's, e.g. runs/demo)")
    p.add_argument("--cache-dir", default=".cache/minillm/demo",
                   help="where the converted SmolLM2 teacher is kept for every run (default .cache/minillm/demo)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA (bf16) when available, else CPU (fp32)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if its outputs are up to date")
    p.add_argument("--sft-temperature", type=float, default=None,
                   help="sample the teacher's training answers (the SFT data) at this temperature instead of the "
                        "profile's; the held-out references stay at T = 1")
    p.add_argument("--student-layers", type=int, default=None,
                   help="how many of the teacher's decoder layers the student keeps (default: the profile's)")
    p.add_argument("--layer-choice", choices=["outer", "even", "influence"], default=None,
                   help="which layers: outer (first and last), even (evenly spaced), influence (highest block "
                        "influence on the teacher's answers, ShortGPT); default: the profile's")
    return p


def profile_from_args(args: argparse.Namespace):
    from .profiles import get_profile

    if args.sft_temperature is not None and not 0.0 < args.sft_temperature <= 2.0:
        raise SystemExit(f"python -m minillm.demo: --sft-temperature {args.sft_temperature} must be in (0, 2]")
    if args.student_layers is not None and args.student_layers < 1:
        raise SystemExit(f"python -m minillm.demo: --student-layers {args.student_layers} must be at least 1")
    return get_profile(choose_profile(args), sft_temperature=args.sft_temperature, keep_layers=args.student_layers,
                       layer_choice=args.layer_choice)


def choose_profile(args: argparse.Namespace) -> str:
    chosen = {name for name, on in (("quick", args.quick), ("tiny", args.assets == "tiny")) if on}
    if args.profile:
        chosen.add(args.profile)
    if len(chosen) > 1:
        raise SystemExit(f"python -m minillm.demo: conflicting choices {sorted(chosen)}: pick one profile")
    return chosen.pop() if chosen else "full"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    profile = profile_from_args(args)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")  # the demo never needs the hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' per-file weight loading/saving bars say nothing useful here; the stages print their own progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from .pipeline import Demo
    from .stages import StageFailed

    out = Path(args.out or profile.out_dir)
    start = time.perf_counter()
    try:
        Demo(profile, out, Path(args.cache_dir), device=args.device, force=args.force).run()
    except (StageFailed, FileNotFoundError, ValueError) as e:
        print(f"[demo] failed: {e}", file=sys.stderr)
        return 1
    print(f"[demo] finished in {time.perf_counter() - start:.1f} s; open {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
