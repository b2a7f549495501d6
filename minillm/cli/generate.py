"""minillm-generate: sample a model's (the teacher's) responses to training prompts into SeqKD JSONL.

    minillm-generate --model runs/sft/gpt2-xl/best --data dolly --out runs/seqkd-data/gpt2-xl/train.jsonl
    minillm-train --config configs/seqkd/gpt2-base.yaml data.train=runs/seqkd-data/gpt2-xl/train.jsonl \
        data.dev=runs/seqkd-data/gpt2-xl/dev.jsonl data.dev_num=0

As the reference, only the training records are sampled: the first --dev-num records (default 1000 for dolly,
its dev split; 0 for other data) are written with their gold references to --dev-out (default dev.jsonl beside
OUT), SeqKD's dev set for picking its checkpoint by dev Rouge-L.

Writes one {"prompt", "output", "index"} line per prompt (prompts over --max-prompt-length tokens are dropped
and counted, as training drops them) and OUT.jsonl.meta.json with the model, data, every sampling setting, the
seed and the counts. Re-running the same command resumes: only records missing from OUT.jsonl are sampled
and appended (a partially written last line is discarded); other settings fail unless --overwrite.
"""

from __future__ import annotations

import argparse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="the model to sample from (usually the SFT teacher)")
    p.add_argument("--data", required=True, metavar="NAME_OR_FILE",
                   help="prompts: a named set (dolly, ...), a local .json/.jsonl file or folder, or a hub id")
    p.add_argument("--out", "--output", dest="out", required=True, metavar="OUT.jsonl", help="output JSONL")
    p.add_argument("--template", default="auto", choices=["auto", "reference", "chat", "raw"],
                   help="prompt template (default auto: a record's prompt, else the reference template)")
    p.add_argument("--split", default="train", help="split of a named set / hub dataset (default train)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are dropped (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    p.add_argument("--top-k", type=int, default=0, help="default 0 (off)")
    p.add_argument("--top-p", type=float, default=1.0, help="default 1.0 (off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="default 0 (off)")
    p.add_argument("--seed", type=int, default=10, help="default 10 (batch k uses seed + k * 100003)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--num", type=int, default=-1, help="sample the first N training records (default -1: all)")
    p.add_argument("--dev-num", type=int, default=None,
                   help="the first N records are the gold dev set: not sampled, written with their references to "
                        "--dev-out (default: 1000 for dolly, as the reference's dev split; 0 otherwise)")
    p.add_argument("--dev-out", default=None, metavar="DEV.jsonl",
                   help="where the gold dev records go (default: dev.jsonl beside --out)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "fast"],
                   help="sampler: hf (transformers generate), fast (minillm's rollout engine: static caches and "
                        "CUDA graphs on CUDA), auto (default: fast on CUDA, hf on CPU or with --no-repeat-ngram-size)")
    p.add_argument("--cache-dir", default=".cache/minillm", help="where named sets are looked up before the hub")
    p.add_argument("--overwrite", action="store_true", help="start OUT.jsonl again instead of resuming")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(make_parser().parse_args(argv))
    from ..errors import UserError
    from ..evaluation.teacher_samples import generate_seqkd_data, settings_from_args
    from . import report_user_error

    try:
        generate_seqkd_data(settings_from_args(args), args["out"], device=args["device"],
                            overwrite=args["overwrite"], progress=args["progress"])
    except (UserError, OSError) as e:  # settings, data, models, paths: one line, exit 2
        return report_user_error("minillm-generate", e)
    return 0


if __name__ == "__main__":
    from . import run_console

    run_console(main)
