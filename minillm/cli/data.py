"""minillm-data: prepare instruction sets and the pre-training corpus on disk, with a kept/dropped report.

    minillm-data --tokenizer gpt2 --train dolly --out data/dolly-gpt2            # dev = first 1000 records
    minillm-data --tokenizer gpt2 --pretrain openwebtext.txt --out data/owt-gpt2 --pretrain-seq-length 512
    minillm-data --tokenizer facebook/opt-1.3b --pretrain roberta-corpus-processed/opt/512/20M/train \
        --out data/roberta-opt      # import the reference's processed Megatron .bin/.idx chunks
    minillm-data --download dolly self_inst vicuna sinst uinst                    # into .cache/minillm/sets/
    minillm-train --config configs/sft/gpt2-base.yaml data.train=data/dolly-gpt2/train.jsonl \\
        data.dev=data/dolly-gpt2/dev.jsonl

Writes OUT/train.jsonl and OUT/dev.jsonl ({prompt, output}, the prompt already templated), OUT/pretrain/
(packed chunks; data.pretrain=OUT/pretrain) and OUT/report.json; prints how many records were read, kept,
dropped (and why) and truncated. A record missing its fields stops the run with its file, line and field,
unless --skip-bad-records counts and skips it.
"""

from __future__ import annotations

import argparse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minillm-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--output", dest="out", default="data/prepared", help="output folder")
    p.add_argument("--tokenizer", metavar="DIR_OR_HUB_ID", help="the student's tokenizer (a model folder works)")
    i = p.add_argument_group("instruction data")
    i.add_argument("--train", metavar="NAME_OR_FILE", help="dolly, dolly-15k, a .json/.jsonl file/folder or a hub id")
    i.add_argument("--dev", metavar="NAME_OR_FILE", help="separate dev source (default: first --dev-num of --train)")
    i.add_argument("--dev-num", type=int, default=1000, help="records split off the start of --train as dev "
                   "(default 1000, as the reference; 0: none)")
    i.add_argument("--template", default="auto", choices=["auto", "reference", "chat", "raw"])
    i.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are dropped (default 256)")
    i.add_argument("--max-length", type=int, default=512, help="sequences are truncated to this (default 512)")
    i.add_argument("--response-field", default="output", help="reference field of {prompt, ...} records")
    i.add_argument("--skip-bad-records", action="store_true",
                   help="count and skip records that lack their fields (local files) instead of failing")
    c = p.add_argument_group("pre-training corpus")
    c.add_argument("--pretrain", nargs="+", default=[], metavar="SOURCE",
                   help="text/.jsonl files, folders, globs or a hub id, packed into OUT/pretrain/; or the "
                        "reference's processed Megatron corpus (a .bin/.idx prefix such as DIR/train_0, a shard "
                        "family DIR/train, or DIR), imported as it is. data.pretrain may also name such a prefix "
                        "directly (read in place, no copy)")
    c.add_argument("--pretrain-seq-length", type=int, default=512, help="tokens per chunk (default 512)")
    c.add_argument("--pretrain-text-field", default="text", help="text field of .jsonl documents")
    c.add_argument("--max-chunks", type=int, default=None, help="stop packing after this many chunks")
    d = p.add_argument_group("downloads")
    d.add_argument("--download", nargs="+", default=[], metavar="NAME",
                   help="fetch named sets (dolly self_inst vicuna sinst uinst dolly-15k) into CACHE/sets/")
    d.add_argument("--cache-dir", default=".cache/minillm", help="default .cache/minillm")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    if not (args["train"] or args["pretrain"] or args["download"]):
        parser.error("nothing to do: give --train, --pretrain and/or --download")
    from ..data.prepare import PrepareSettings, prepare
    from ..errors import UserError
    from . import report_user_error

    try:
        prepare(PrepareSettings(**args))
    except (UserError, OSError) as e:  # data, tokenizer, paths: one line, exit 2
        return report_user_error("minillm-data", e)
    return 0


if __name__ == "__main__":
    from . import run_console

    run_console(main)
