"""minillm-compare: train several distillation methods on the same data and seeds, evaluate them side by side.

    minillm-compare --pair tiny --methods sft kd kd-rkl gkd distillm seqkd minillm minillm-single-step \
        minillm-ranking --data tests/assets/data/dev.jsonl --out runs/compare/tiny --num 16 --max-new-tokens 24
    minillm-compare --pair gpt2-base --methods kd kd-srkl gkd distillm minillm --data dolly self_inst vicuna \
        sinst uinst --eval-seeds 10 20 30 40 50 --out runs/compare/gpt2-base --launcher "deepspeed --num_gpus 8"

Methods: sft kd seqkd minillm gkd distillm minillm-single-step minillm-ranking opd (on-policy distillation,
minillm.objective=opd) (configs/<method>/<pair>.yaml, or
configs/tiny/<method>.yaml for --pair tiny), and <kd|seqkd|gkd|distillm>-<fkl|rkl|jsd|tvd|sfkl|srkl> for the same
recipe with another word-level divergence. Every run gets --seed and the --train-override values; the picked
models (best/ by dev Rouge-L, else final/) are evaluated by one minillm-eval call. Writes OUT/runs/<method>/,
OUT/eval/ (results.json, table.md), OUT/compare.json and OUT/compare.md (the table, also printed).
"""

from __future__ import annotations

import argparse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", required=True, help="methods to train and compare (see above)")
    p.add_argument("--pair", required=True, help="model pair: a recipe name such as gpt2-base or opt-1.3b, or tiny")
    p.add_argument("--data", nargs="+", required=True, help="evaluation sets, as minillm-eval --data")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=10, help="training seed of every run (default 10)")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[10], help="generation seeds of the evaluation")
    p.add_argument("--train-override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every run, e.g. train.max_steps=100")
    p.add_argument("--pick", choices=["best", "final"], default="best", help="model evaluated per run")
    p.add_argument("--num", type=int, default=-1, help="first N records of each evaluation set (-1: all)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="evaluation response length (protocol: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation generation batch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="evaluation device")
    p.add_argument("--launcher", default="", help='train in a subprocess under this launcher, e.g. '
                   '"deepspeed --num_gpus 8" (default: in this process)')
    p.add_argument("--skip-trained", action="store_true", help="reuse runs that already have final/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the evaluation")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from ..compare import CompareError, run_comparison
    from ..config import ConfigError

    try:
        run_comparison(args.methods, args.pair, args.out, args.data, seed=args.seed, eval_seeds=args.eval_seeds,
                       train_overrides=args.train_override, pick=args.pick, num=args.num,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device,
                       launcher=args.launcher, skip_trained=args.skip_trained, progress=not args.no_progress)
    except (CompareError, ConfigError) as e:
        from . import report_user_error

        return report_user_error("minillm-compare", e)
    return 0


if __name__ == "__main__":
    from . import run_console

    run_console(main)
