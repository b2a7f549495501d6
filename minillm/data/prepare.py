"""``minillm-data``: fetch, template, tokenise, split and cache the instruction sets and the pre-training corpus.

What it writes under ``out`` (each consumable by the trainer as it is):

- ``train.jsonl`` / ``dev.jsonl``: the kept records as ``{"prompt": <rendered prompt>, "output": <reference(s)>}``
  (train with ``data.train=OUT/train.jsonl data.dev=OUT/dev.jsonl``; template ``auto`` uses the prompt as is).
  Dev is the first ``dev_num`` records of the training source (Dolly: 1000, as the reference) unless a separate
  dev source is given. Records are kept or dropped exactly as the trainer's tokenisation decides
  (:func:`minillm.data.tokenize_records`: prompts over ``max_prompt_length`` tokens are dropped, sequences cut to
  ``max_length``), so the trainer reads back the same examples.
- ``pretrain/``: the packed corpus (:func:`minillm.data.pack_corpus`; ``data.pretrain=OUT/pretrain``), or the
  reference's processed Megatron ``.bin``/``.idx`` corpus imported into that form
  (:func:`minillm.data.pretrain.import_megatron`, when ``pretrain`` names its prefix).
- ``report.json``: read / kept / dropped (with reasons) / truncated per split, the corpus counts, the settings.

Named evaluation sets can be fetched into ``cache_dir/sets/<name>/`` where :func:`minillm.data.load_records`
(and so ``minillm-eval`` and the trainer) finds them offline afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .instruction import DataStats, split_off_dev, tokenize_records
from .records import NAMED_SETS, DataError, Record, _download_named, _named_file, load_records, parse_record, \
    read_json_objects
from .templates import render_prompt

MISSING_FIELD = "bad_record"


@dataclass
class PrepareSettings:
    """The options of ``minillm-data`` (see its ``--help``)."""

    out: str
    tokenizer: Optional[str] = None
    train: Optional[str] = None
    dev: Optional[str] = None
    dev_num: int = 1000
    template: str = "auto"
    max_prompt_length: int = 256
    max_length: int = 512
    response_field: str = "output"
    skip_bad_records: bool = False
    pretrain: list[str] = field(default_factory=list)
    pretrain_seq_length: int = 512
    pretrain_text_field: str = "text"
    max_chunks: Optional[int] = None
    download: list[str] = field(default_factory=list)
    cache_dir: str = ".cache/minillm"


def _read_lenient(source: str, response_field: str, stats: DataStats, problems: list[str]) -> list[Record]:
    """Records of a local file, counting (not raising on) records that lack their fields."""
    path = Path(source)
    if not path.is_file():
        raise DataError(f"--skip-bad-records needs a local .json/.jsonl file, `{source}` is not one")
    records = []
    for line, obj in read_json_objects(path):
        try:
            records.append(parse_record(obj, str(path), line, response_field=response_field))
        except DataError as e:
            stats.drop(MISSING_FIELD)
            if len(problems) < 20:
                problems.append(str(e))
    return records


def _load(source: str, split: str, settings: PrepareSettings, stats: DataStats, problems: list[str]) -> list[Record]:
    if settings.skip_bad_records and Path(source).is_file():
        records = _read_lenient(source, settings.response_field, stats, problems)
    else:
        records = load_records(source, split=split, cache_dir=settings.cache_dir,
                               response_field=settings.response_field)
    stats.total = len(records) + stats.dropped.get(MISSING_FIELD, 0)
    return records


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _split_rows(records: list[Record], tokenizer, stats: DataStats, settings: PrepareSettings) -> list[dict[str, Any]]:
    kept = tokenize_records(records, tokenizer, stats, template=settings.template,
                            max_prompt_length=settings.max_prompt_length, max_length=settings.max_length)
    rows = []
    for ex in kept:
        record = records[ex.index]
        refs = record.references
        rows.append({"prompt": render_prompt(record, tokenizer, settings.template),
                     "output": refs[0] if len(refs) == 1 else refs})
    return rows


def download_sets(names: list[str], cache_dir: str, log: Callable[[str], None]) -> dict[str, list[str]]:
    """Fetch every file of the named sets into ``cache_dir/sets/<name>/`` (where load_records looks first)."""
    got: dict[str, list[str]] = {}
    for name in names:
        if name not in NAMED_SETS:
            raise DataError(f"--download: unknown set `{name}` (known: {', '.join(NAMED_SETS)})")
        got[name] = []
        for split in NAMED_SETS[name].files:
            _, filename = _named_file(name, split)
            target = Path(cache_dir) / "sets" / name / filename
            source = _download_named(name, split, cache_dir)
            if Path(source) != target:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            got[name].append(str(target))
            log(f"[minillm-data] {name} ({split}): {target}")
    return got


def prepare(settings: PrepareSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Do what the settings ask; returns (and writes to ``out/report.json``) the report."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": asdict(settings)}
    if settings.download:
        report["downloaded"] = download_sets(settings.download, settings.cache_dir, log)
    tokenizer = None
    if settings.train or settings.pretrain:
        if not settings.tokenizer:
            raise DataError("--tokenizer is required to tokenise instruction data or pack a corpus (the student's "
                            "model folder or hub id)")
        from ..config import ModelConfig
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(path=settings.tokenizer))
    if settings.train:
        if settings.max_prompt_length >= settings.max_length:
            raise DataError(f"--max-prompt-length ({settings.max_prompt_length}) must be below --max-length "
                            f"({settings.max_length})")
        problems: list[str] = []
        train_stats = DataStats("train", settings.train)
        records = _load(settings.train, "train", settings, train_stats, problems)
        dev_records: list[Record] = []
        dev_stats = None
        if settings.dev:
            dev_stats = DataStats("dev", settings.dev)
            dev_records = _load(settings.dev, "dev", settings, dev_stats, problems)
        elif settings.dev_num > 0:
            dev_records, records, dev_stats = split_off_dev(records, settings.dev_num, train_stats, settings.train,
                                                            where=f"`{settings.train}` (usable records)",
                                                            dev_num_key="--dev-num", dev_key="--dev")
        splits = [("train", records, train_stats)] + ([("dev", dev_records, dev_stats)] if dev_stats else [])
        for name, recs, stats in splits:
            rows = _split_rows(recs, tokenizer, stats, settings)
            _write_jsonl(out / f"{name}.jsonl", rows)
            report[name] = asdict(stats) | {"file": str(out / f"{name}.jsonl")}
            log(f"[minillm-data] {stats} -> {out / f'{name}.jsonl'}")
        if problems:
            report["bad_records"] = problems
            for problem in problems[:5]:
                log(f"[minillm-data]   skipped: {problem}")
    if settings.pretrain:
        from .megatron import is_megatron_source
        from .pretrain import import_megatron, pack_corpus

        megatron = [s for s in settings.pretrain if is_megatron_source(s)]
        if megatron and len(settings.pretrain) > 1:
            raise DataError(f"--pretrain: the Megatron corpus {megatron[0]} must be the only source (it is imported "
                            "as it is, not mixed with text)")
        if megatron:  # the reference's processed .bin/.idx chunks, copied into a packed corpus
            corpus = import_megatron(megatron[0], tokenizer, out / "pretrain", settings.pretrain_seq_length,
                                     max_chunks=settings.max_chunks)
        else:
            corpus = pack_corpus(settings.pretrain, tokenizer, out / "pretrain", settings.pretrain_seq_length,
                                 settings.pretrain_text_field, max_chunks=settings.max_chunks)
        meta = {k: v for k, v in corpus.meta.items() if k != "sources" or len(v) <= 20}
        report["pretrain"] = meta | {"folder": str(out / "pretrain")}
        log(f"[minillm-data] pre-training corpus: {len(corpus)} chunks of {corpus.seq_length} tokens "
            f"-> {out / 'pretrain'}")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(f"[minillm-data] report: {out / 'report.json'}")
    return report
