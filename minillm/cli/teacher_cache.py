"""minillm-teacher-cache: the teacher's top-k distributions on fixed data, computed once.

    # MiniLLM's PT loss: a packed pre-training corpus
    minillm-teacher-cache --corpus .cache/minillm/roberta-opt --teacher runs/sft/opt-13b/best --top-k 64 \
        --out .cache/minillm/roberta-opt-teacher-top64 --device cuda --dtype bf16
    minillm-train --config opt-1.3b.yaml minillm.pt_teacher_cache=.cache/minillm/roberta-opt-teacher-top64

    # word-level KD / SeqKD: the training set of a run config (same data, template and tokenizer as the run)
    minillm-teacher-cache --config configs/kd/opt-1.3b.yaml --top-k 64 --out .cache/minillm/kd-opt-1.3b-top64 \
        --device cuda
    minillm-train --config configs/kd/opt-1.3b.yaml kd.teacher_cache=.cache/minillm/kd-opt-1.3b-top64

MiniLLM's pre-training loss is half word-level KD on corpus chunks, and KD/SeqKD revisit the same training set every
epoch: with a cache the trainer reads the teacher's distributions instead of running the teacher again. The
top-k log-probs are stored per position; the remaining mass is spread evenly over the other entries when read
back (exact when k equals the vocabulary).
"""

from __future__ import annotations

import argparse
import sys


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-teacher-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", metavar="DIR", help="a packed corpus folder (minillm-data --pretrain)")
    source.add_argument("--config", metavar="YAML", help="a kd/seqkd run config: cache its training set")
    p.add_argument("overrides", nargs="*", help="with --config: key.sub=value overrides, as minillm-train takes")
    p.add_argument("--teacher", metavar="DIR", help="the teacher (HF folder or hub id); with --config default: "
                   "its teacher.path")
    p.add_argument("--out", required=True, metavar="DIR", help="the cache folder to write")
    p.add_argument("--top-k", type=int, default=64, help="entries kept per position (default 64)")
    p.add_argument("--storage", default="fp16", choices=["fp16", "fp32"], help="log-prob storage (default fp16)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--corpus: cut the teacher's logits to this many entries (the tokenizer's size when the "
                        "embedding matrix is padded, e.g. Qwen2.5); default: all output rows. --config cuts to the "
                        "tokenizer, as the trainer does")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="teacher weights (default: fp32; with --config its teacher.dtype)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repository to run")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from ..config import ConfigError, StrategyConfig
    from ..data.records import DataError
    from ..models import ModelCompatibilityError
    from ..strategy import _pick_device

    if args.corpus and args.overrides:
        print("minillm-teacher-cache: error: key=value overrides need --config", file=sys.stderr)
        return 2
    if args.corpus and not args.teacher:
        print("minillm-teacher-cache: error: --corpus needs --teacher", file=sys.stderr)
        return 2
    device = _pick_device(StrategyConfig(device=args.device))
    try:
        out, what = (_training_set_cache if args.config else _corpus_cache)(args, device)
    except (ConfigError, DataError, ModelCompatibilityError, OSError, ValueError) as e:
        from . import report_user_error

        return report_user_error("minillm-teacher-cache", e)
    print(f"minillm-teacher-cache: wrote {out} ({what}, top-{args.top_k})")
    return 0


def _corpus_cache(args, device):
    from ..config import ModelConfig
    from ..data.pretrain import PackedCorpus
    from ..data.teacher_cache import build_teacher_topk_cache
    from ..models import load_model

    corpus = PackedCorpus(args.corpus)
    teacher = load_model(ModelConfig(path=args.teacher, dtype=args.dtype or "fp32",
                                     trust_remote_code=args.trust_remote_code), trainable=False, device=device)
    vocab = args.vocab_size
    out = build_teacher_topk_cache(corpus, teacher, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                   storage=args.storage, device=device, progress=args.progress,
                                   trim=(lambda x: x[..., :vocab]) if vocab else (lambda x: x),
                                   teacher_name=args.teacher)
    return out, f"{len(corpus)} chunks x {corpus.seq_length - 1} positions"


def _training_set_cache(args, device):
    """The run's training set, built exactly as minillm-train builds it, through the run's teacher."""
    from dataclasses import replace

    from ..config import load_config
    from ..data import build_instruction_data
    from ..data.kd_cache import build_response_topk_cache
    from ..models import check_compatibility, load_model, load_model_shape, load_tokenizer

    cfg = load_config(args.config, args.overrides)
    if cfg.method not in ("kd", "seqkd"):
        raise ValueError(f"{args.config}: method `{cfg.method}`; a training-set cache serves methods kd and seqkd "
                         "(MiniLLM's PT loss: --corpus)")
    teacher_cfg = replace(cfg.teacher, path=args.teacher or cfg.teacher.path, dtype=args.dtype or cfg.teacher.dtype,
                          trust_remote_code=cfg.teacher.trust_remote_code or args.trust_remote_code)
    tokenizer = load_tokenizer(cfg.student)
    data = build_instruction_data(cfg.data, tokenizer, seed=cfg.seed)
    teacher = load_model(teacher_cfg, trainable=False, device=device)
    teacher_tok = load_tokenizer(teacher_cfg) if (teacher_cfg.tokenizer or teacher_cfg.path) != (
        cfg.student.tokenizer or cfg.student.path) else None
    alignment = check_compatibility(load_model_shape(cfg.student), teacher, tokenizer, teacher_tok)
    out = build_response_topk_cache(data.train, teacher, args.out, top_k=args.top_k,
                                    pad_token_id=data.sft_collator.pad_token_id, batch_size=args.batch_size,
                                    storage=args.storage, device=device, trim=alignment.trim,
                                    progress=args.progress, teacher_name=teacher_cfg.path)
    positions = data.train.num_response_tokens()
    return out, f"{len(data.train)} training examples, {positions} loss positions"


if __name__ == "__main__":
    from . import run_console

    run_console(main)
