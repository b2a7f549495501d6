"""Instruction data: tokenisation, SFT and prompt datasets, the dev split and the read/kept/dropped report.

Tokenisation follows the reference (lmops-notes §6)::

    prompt_ids   = encode(prompt, add_special_tokens=False)
    full         = encode(prompt + response, add_special_tokens=False) + [eos]
    response_ids = full[len(prompt_ids):]
    sequence     = (prompt_ids + response_ids)[:max_length]

Prompts longer than ``max_prompt_length`` tokens are dropped and counted. An SFT item is
``input_ids = sequence[:-1]``, ``labels = sequence[1:]`` with the prompt positions set to −100, so the loss
covers the response and its EOS only. Training uses a record's first reference; the prompt datasets keep
all references for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .collate import IGNORE_INDEX, PromptCollator, SFTCollator, resolve_pad_id
from .records import DataError, Record, load_records, load_train_records, train_sources
from .templates import TemplateMode, render_prompt

# Reasons a record is not used; the keys of DataStats.dropped.
PROMPT_TOO_LONG = "prompt_too_long"
EMPTY_PROMPT = "empty_prompt"
NO_RESPONSE_LEFT = "no_response_tokens_after_truncation"

_BATCH = 1000  # records per batched tokenizer call (fast tokenizers encode a list in parallel Rust code)


# ----------------------------------------------------------------------------------------- report
@dataclass
class DataStats:
    """What happened to the records of one split: read, kept, dropped (with reasons), truncated."""

    name: str
    source: str = ""
    total: int = 0          # records in the source
    split_off: int = 0      # records moved to the dev set (dev taken from train)
    limited: int = 0        # records left out by max_*_records
    read: int = 0           # records tokenised
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0      # kept sequences cut to max_length
    max_prompt_length: int = 0
    max_length: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        labels = {PROMPT_TOO_LONG: f"prompt > {self.max_prompt_length} tokens", EMPTY_PROMPT: "empty prompt",
                  NO_RESPONSE_LEFT: f"no response token within {self.max_length}"}
        text = f"{self.name} ({self.source}): {self.read} read, {self.kept} kept, {self.num_dropped} dropped"
        if self.dropped:
            text += " [" + ", ".join(f"{labels.get(k, k)}: {v}" for k, v in sorted(self.dropped.items())) + "]"
        text += f", {self.truncated} truncated to {self.max_length} tokens"
        extra = []
        if self.split_off:
            extra.append(f"{self.split_off} split off as dev")
        if self.limited:
            extra.append(f"{self.limited} over the record limit")
        if extra:
            text += f" ({self.total} in source; " + ", ".join(extra) + ")"
        return text


@dataclass
class DataReport:
    """The report of :func:`build_instruction_data`: train and dev statistics, printable in one line."""

    train: DataStats
    dev: Optional[DataStats] = None

    def __str__(self) -> str:
        return str(self.train) + ("; " + str(self.dev) if self.dev is not None else "; no dev set")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"train": asdict(self.train), "dev": asdict(self.dev) if self.dev is not None else None}


# ----------------------------------------------------------------------------------------- tokenisation
@dataclass
class TokenizedExample:
    """One kept record: ``ids`` = prompt + response (+EOS), cut to max_length; ``prompt_length`` tokens of
    it are the prompt (before truncation, the prompt is never cut since max_prompt_length < max_length)."""

    ids: list[int]
    prompt_length: int
    index: int              # position of the record in its split's record list
    references: list[str]
    truncated: bool = False


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        out.extend(tokenizer(list(texts[start:start + _BATCH]), add_special_tokens=False)["input_ids"])
    return out


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer `{getattr(tokenizer, 'name_or_path', '?')}` has no EOS token; "
                        "SFT targets end with EOS")
    return int(eos)


def tokenize_records(records: Sequence[Record], tokenizer, stats: DataStats, *, template: TemplateMode = "auto",
                     max_prompt_length: int = 256, max_length: int = 512) -> list[TokenizedExample]:
    """Tokenise prompt and prompt+first reference of each record (module docstring); update ``stats``."""
    if max_prompt_length >= max_length:
        raise DataError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    eos = _eos_id(tokenizer)
    stats.read += len(records)
    stats.max_prompt_length, stats.max_length = max_prompt_length, max_length
    prompts = [render_prompt(r, tokenizer, template) for r in records]
    prompt_ids = _encode_many(tokenizer, prompts)
    fits = [i for i, ids in enumerate(prompt_ids) if 0 < len(ids) <= max_prompt_length]
    full_ids = _encode_many(tokenizer, [prompts[i] + records[i].response for i in fits])
    full_by_index = dict(zip(fits, full_ids))
    examples: list[TokenizedExample] = []
    for i, ids in enumerate(prompt_ids):
        if not ids:
            stats.drop(EMPTY_PROMPT)
            continue
        if len(ids) > max_prompt_length:
            stats.drop(PROMPT_TOO_LONG)
            continue
        full = full_by_index[i] + [eos]
        # Like the reference, the response is what follows the prompt's token count in the joint encoding,
        # so a BPE merge across the boundary moves into the response instead of being split in two.
        sequence = ids + full[len(ids):]
        truncated = len(sequence) > max_length
        sequence = sequence[:max_length]
        if len(sequence) <= len(ids):
            stats.drop(NO_RESPONSE_LEFT)
            continue
        stats.truncated += int(truncated)
        stats.kept += 1
        examples.append(TokenizedExample(sequence, len(ids), i, list(records[i].references), truncated))
    return examples


def sft_item(ids: Sequence[int], prompt_length: int) -> dict[str, torch.Tensor]:
    """``input_ids = ids[:-1]``, ``labels = ids[1:]`` with the first ``prompt_length − 1`` labels (those that
    predict prompt tokens) set to −100: the loss covers the response and its EOS only."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    labels = ids_t[1:].clone()
    labels[: max(prompt_length - 1, 0)] = IGNORE_INDEX
    return {"input_ids": ids_t[:-1], "labels": labels}


# ----------------------------------------------------------------------------------------- datasets
class SFTDataset(Dataset):
    """Items ``{input_ids [L-1], labels [L-1]}`` (torch.long) and ``index`` (the item's position) for
    teacher-forced training and dev loss."""

    def __init__(self, examples: Sequence[TokenizedExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        return {**sft_item(ex.ids, ex.prompt_length), "index": i}

    def num_response_tokens(self) -> int:
        """Tokens the loss covers over the whole set (response + EOS of every item)."""
        return sum(len(ex.ids) - ex.prompt_length for ex in self.examples)


class PromptDataset(Dataset):
    """Items ``{input_ids [P] (torch.long), references: list[str], index: int}`` for generation."""

    def __init__(self, prompt_ids: Sequence[Sequence[int]], references: Sequence[Sequence[str]],
                 indices: Sequence[int]):
        if not len(prompt_ids) == len(references) == len(indices):
            raise ValueError("prompt_ids, references and indices must have the same length")
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.references = [list(r) for r in references]
        self.indices = [int(i) for i in indices]

    @classmethod
    def from_examples(cls, examples: Sequence[TokenizedExample]) -> "PromptDataset":
        return cls([ex.ids[: ex.prompt_length] for ex in examples], [ex.references for ex in examples],
                   [ex.index for ex in examples])

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": torch.as_tensor(self.prompt_ids[i], dtype=torch.long),
                "references": self.references[i], "index": self.indices[i]}


def build_prompt_dataset(records: Sequence[Record], tokenizer, *, template: TemplateMode = "auto",
                         max_prompt_length: int = 256, overflow: Literal["drop", "truncate"] = "truncate",
                         name: str = "prompts") -> tuple[PromptDataset, DataStats]:
    """Prompts only (evaluation, ``minillm-generate``): records may lack references.

    ``overflow="truncate"`` keeps the first ``max_prompt_length`` tokens (the evaluation protocol, DESIGN §6);
    ``"drop"`` drops longer prompts as training does. Either way the count is in the returned stats.
    """
    stats = DataStats(name, records[0].source if records else "", total=len(records), read=len(records),
                      max_prompt_length=max_prompt_length)
    ids_all = _encode_many(tokenizer, [render_prompt(r, tokenizer, template) for r in records])
    kept_ids, refs, indices = [], [], []
    for i, ids in enumerate(ids_all):
        if not ids:
            stats.drop(EMPTY_PROMPT)
            continue
        if len(ids) > max_prompt_length:
            if overflow == "drop":
                stats.drop(PROMPT_TOO_LONG)
                continue
            ids = ids[:max_prompt_length]
            stats.truncated += 1
        kept_ids.append(ids)
        refs.append(records[i].references)
        indices.append(i)
    stats.kept = len(kept_ids)
    return PromptDataset(kept_ids, refs, indices), stats


# ----------------------------------------------------------------------------------------- the builder
@dataclass
class InstructionData:
    """Everything the trainers need from instruction data.

    ``train``/``dev``: SFT datasets (teacher-forced loss); ``train_prompts``/``dev_prompts``: the same kept
    records as prompt datasets (MiniLLM rollouts, dev generation); the collators; the report; the records of
    each split (``PromptDataset`` ``index`` values point into them).
    """

    train: SFTDataset
    dev: Optional[SFTDataset]
    train_prompts: PromptDataset
    dev_prompts: Optional[PromptDataset]
    sft_collator: SFTCollator
    prompt_collator: PromptCollator
    stats: DataReport
    train_records: list[Record]
    dev_records: list[Record]
    seed: int = 10


def split_off_dev(records: list[Record], dev_num: int, train_stats: DataStats, source: str, *, where: str,
                  dev_num_key: str, dev_key: str) -> tuple[list[Record], list[Record], DataStats]:
    """The reference's dev split: the first ``dev_num`` records become dev, the rest train (no shuffle).

    Returns (dev records, train records, dev stats) and records the split in ``train_stats``; fails when nothing
    would be left to train on, naming ``where`` and the settings (``dev_num_key``, ``dev_key``) to change.
    """
    if dev_num >= len(records):
        raise DataError(f"{where} has {len(records)} records, not more than {dev_num_key}={dev_num} that would be "
                        f"split off as dev; lower {dev_num_key} (0: no dev split) or give {dev_key}")
    dev_records, rest = records[:dev_num], records[dev_num:]
    train_stats.split_off = len(dev_records)
    return dev_records, rest, DataStats("dev", f"first {len(dev_records)} of {source}", total=len(dev_records))


def _limit(records: list[Record], limit: int, stats: DataStats) -> list[Record]:
    if 0 <= limit < len(records):
        stats.limited = len(records) - limit
        return records[:limit]
    return records


def build_instruction_data(cfg, tokenizer, seed: int = 10, *, require_dev: bool = False) -> InstructionData:
    """Load, split, tokenise and report the instruction data of a ``DataConfig``.

    ``cfg.train`` is one source or a list of them, read in order into one training set (each record keeps its
    source in ``Record.origin``, for routing by file or dataset). Dev: ``cfg.dev`` when given (its evaluation split
    for named sets), else the first ``cfg.dev_num`` records of ``cfg.train``, of the concatenation for a list (the
    reference's Dolly split; ``dev_num=0``: no dev set). Then ``max_train_records`` and ``max_dev_records`` keep
    the first N of each split. The split is deterministic and does not shuffle, as in the reference; ``seed`` is
    recorded in the result for the samplers built on it.
    """
    kw = dict(cache_dir=cfg.cache_dir, response_field=cfg.response_field)
    records = load_train_records(cfg.train, split="train", **kw)
    train = ", ".join(train_sources(cfg.train))  # data.train as text: its one source, or its list's sources
    train_stats = DataStats("train", train, total=len(records))
    dev_stats: Optional[DataStats] = None
    dev_records: list[Record] = []
    if cfg.dev is not None:
        dev_records = load_records(cfg.dev, split="dev", **kw)
        dev_stats = DataStats("dev", cfg.dev, total=len(dev_records))
    elif cfg.dev_num > 0:
        dev_records, records, dev_stats = split_off_dev(records, cfg.dev_num, train_stats, train,
                                                        where=f"data.train `{train}`", dev_num_key="data.dev_num",
                                                        dev_key="data.dev")
    elif require_dev:
        raise DataError("a dev set is required: set data.dev or data.dev_num > 0")
    records = _limit(records, cfg.max_train_records, train_stats)
    if dev_stats is not None:
        dev_records = _limit(dev_records, cfg.max_dev_records, dev_stats)

    pad_id = resolve_pad_id(tokenizer)
    lengths = dict(template=cfg.template, max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
    train_examples = tokenize_records(records, tokenizer, train_stats, **lengths)
    if not train_examples:
        raise DataError(f"no training example is left from `{train}`: {train_stats}")
    dev_set = dev_prompts = None
    if dev_stats is not None:
        dev_examples = tokenize_records(dev_records, tokenizer, dev_stats, **lengths)
        dev_set, dev_prompts = SFTDataset(dev_examples), PromptDataset.from_examples(dev_examples)
    return InstructionData(
        train=SFTDataset(train_examples), dev=dev_set, train_prompts=PromptDataset.from_examples(train_examples),
        dev_prompts=dev_prompts, sft_collator=SFTCollator(pad_id), prompt_collator=PromptCollator(pad_id),
        stats=DataReport(train_stats, dev_stats), train_records=records, dev_records=dev_records, seed=seed)
