"""minillm-teacher-cache: the teacher's top-k distributions on a packed pre-training corpus, computed once.

    minillm-teacher-cache --corpus .cache/minillm/roberta-opt --teacher runs/sft/opt-13b/best --top-k 64 \
        --out .cache/minillm/roberta-opt-teacher-top64 --device cuda --dtype bf16
    minillm-train --config opt-1.3b.yaml minillm.pt_teacher_cache=.cache/minillm/roberta-opt-teacher-top64

MiniLLM's pre-training loss is half word-level KD on corpus chunks; with the cache the trainer reads the teacher's
distributions instead of running the teacher on every PT micro-batch. The top-k log-probs are stored per position;
the remaining mass is spread evenly over the other entries when read back (exact when k equals the vocabulary).
"""

from __future__ import annotations

import argparse
import sys


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-teacher-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, metavar="DIR", help="a packed corpus folder (minillm-data --pretrain)")
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher (HF folder or hub id)")
    p.add_argument("--out", required=True, metavar="DIR", help="the cache folder to write")
    p.add_argument("--top-k", type=int, default=64, help="entries kept per position (default 64)")
    p.add_argument("--storage", default="fp16", choices=["fp16", "fp32"], help="log-prob storage (default fp16)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per teacher forward (default 8)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="cut the teacher's logits to this many entries (the tokenizer's size when the embedding "
                        "matrix is padded, e.g. Qwen2.5); default: all output rows")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="teacher weights (default fp32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repository to run")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from ..config import ModelConfig, StrategyConfig
    from ..data.pretrain import PackedCorpus
    from ..data.records import DataError
    from ..data.teacher_cache import build_teacher_topk_cache
    from ..models import load_model
    from ..strategy import _pick_device

    device = _pick_device(StrategyConfig(device=args.device))
    try:
        corpus = PackedCorpus(args.corpus)
        teacher = load_model(ModelConfig(path=args.teacher, dtype=args.dtype, trust_remote_code=args.trust_remote_code),
                             trainable=False, device=device)
        vocab = args.vocab_size
        out = build_teacher_topk_cache(corpus, teacher, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                       storage=args.storage, device=device, progress=args.progress,
                                       trim=(lambda x: x[..., :vocab]) if vocab else (lambda x: x),
                                       teacher_name=args.teacher)
    except (DataError, OSError, ValueError) as e:
        print(f"minillm-teacher-cache: error: {e}", file=sys.stderr)
        return 1
    print(f"minillm-teacher-cache: wrote {out} ({len(corpus)} chunks x {corpus.seq_length - 1} positions, "
          f"top-{args.top_k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
