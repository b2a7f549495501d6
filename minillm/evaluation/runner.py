"""The evaluation protocol of ``minillm-eval`` (DESIGN §6), importable for notebooks and tests.

For every model × set × seed: the set's prompts (a record's ``prompt`` field, or its rendered template for
instruction-only records) are tokenised without special tokens (with ``prompt_bos``: with the tokenizer's
default special tokens, as the pre-2024 reference did, so OPT/LLaMA prompts start with BOS), cut to their **first** ``max_prompt_length``
tokens (evaluation truncates; training drops) and left-padded; one response per prompt is sampled (T = 1,
top-k 0, top-p 1, 256 new tokens by default, ``torch.manual_seed(seed + rank)``); responses are decoded without
special tokens and stripped; Rouge-L and exact match are the max over references, mean ×100. A sample's
``prompt`` in the per-seed JSON is the decoded text of the prompt tokens the model saw (after the cut).

Per seed the metrics of a set are one number each; ``mean`` and ``std`` are taken over the seeds. The std is
the **population** standard deviation (ddof = 0, ``numpy.std``'s default): it is defined for a single seed
(0) and describes the seeds actually run rather than estimating a wider population.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) each rank generates for a contiguous shard of the prompts
(padded with copies of the last prompt so that every rank runs the same number of batches) and rank 0
gathers, de-duplicates and writes. With ``zero3`` the model (and teacher) are DeepSpeed ZeRO-3 inference
engines, sharded over the ranks (loaded straight into shards through transformers' ``HfDeepSpeedConfig``),
and generation runs with ``synced_gpus``. Both go through
:class:`minillm.strategy.DeepSpeedStrategy`. Sampled outputs depend on the number of ranks (each rank seeds
``seed + rank``, as the reference does), so compare runs made with the same world size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data import DataStats, PromptCollator, PromptDataset, Record, build_prompt_dataset, load_records, resolve_pad_id
from ..data.records import looks_like_hub_id
from ..data.templates import render_prompt
from .metrics import distinct_n, exact_match, rouge_l
from .settings import EvalSettings

# Metrics written per seed (when computed); the order of the table columns in table_all.md.
SEED_METRICS = ("rougeL", "exact_match", "dist4", "teacher_logprob", "reverse_kl_k3", "judge")


# ============================================================================================ names
def model_names(paths: Sequence[str], names: Sequence[str] = ()) -> list[str]:
    """The ``--name`` values, else each folder's name; ``parent/child`` for the folders whose names collide."""
    if names:
        return list(names)
    parts = [Path(p.rstrip("/")).parts or (p,) for p in paths]
    short = [part[-1] for part in parts]
    out = []
    for part, name in zip(parts, short):
        out.append("/".join(part[-2:]) if short.count(name) > 1 and len(part) > 1 else name)
    if len(set(out)) != len(out):
        raise ValueError(f"models {list(paths)} get the same names {out}; give --name for each")
    return out


def set_names(sources: Sequence[str]) -> list[str]:
    """A named set's name, a file's stem, a folder's name or a hub id's last part; parent/… on collisions."""
    def short(source: str) -> str:
        path = Path(source.rstrip("/"))
        if path.suffix in (".json", ".jsonl"):
            return path.stem
        if looks_like_hub_id(source) and not path.exists():
            return source.split("/")[-1]
        return path.name or source

    shorts = [short(s) for s in sources]
    out = []
    for source, name in zip(sources, shorts):
        if shorts.count(name) > 1:
            parent = Path(source.rstrip("/")).parent.name
            name = f"{parent}/{name}" if parent else name
        out.append(name)
    if len(set(out)) != len(out):
        raise ValueError(f"evaluation sets {list(sources)} get the same names {out}; pass each set once")
    return out


# ============================================================================================ sets
@dataclass
class EvalSet:
    """One evaluation set tokenised for one tokenizer.

    ``prompts`` holds the kept prompts' ids (already cut to ``max_prompt_length``) with their references and
    record indices; ``prompt_texts`` the full rendered prompts and ``questions`` the instruction (+ input) of
    each record (what an LLM judge is shown), both indexed by record.
    """

    name: str
    source: str
    records: list[Record]
    prompts: PromptDataset
    stats: DataStats
    prompt_texts: list[str]
    questions: list[str]


def _question(record: Record, prompt: str) -> str:
    if record.instruction is None:
        return prompt
    return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction


def read_eval_records(source: str, settings: EvalSettings) -> list[Record]:
    """The records of ``source``'s evaluation split (a named set's test file), validated."""
    return load_records(source, split="test", cache_dir=settings.cache_dir)


class DefaultSpecialTokens:
    """A view of ``tokenizer`` whose calls always encode with the tokenizer's own default special tokens.

    The pre-2024 reference encoded evaluation prompts with ``tokenizer.encode(prompt)``: whatever the tokenizer
    adds by default (OPT: ``</s>`` first, LLaMA: ``<s>`` first, GPT-2 and Qwen: nothing) went in front of the
    prompt and counted towards its first ``max_prompt_length`` tokens. Passing this view to the shared prompt
    builder keeps its rendering, cutting and counting identical and changes only that.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        kwargs.pop("add_special_tokens", None)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def load_eval_set(source: str, name: str, tokenizer, settings: EvalSettings,
                  records: Optional[list[Record]] = None) -> EvalSet:
    """Read ``source`` (its evaluation split) unless ``records`` are given, keep the first ``settings.num`` records
    and tokenise the prompts."""
    records = read_eval_records(source, settings) if records is None else records
    if 0 <= settings.num < len(records):
        records = records[: settings.num]
    encoder = DefaultSpecialTokens(tokenizer) if settings.prompt_bos else tokenizer
    prompts, stats = build_prompt_dataset(records, encoder, template=settings.template,
                                          max_prompt_length=settings.max_prompt_length, overflow="truncate",
                                          name=name)
    if len(prompts) == 0:
        raise ValueError(f"evaluation set `{source}`: no prompt is left ({stats})")
    texts = [render_prompt(r, tokenizer, settings.template) for r in records]
    return EvalSet(name, source, records, prompts, stats, texts,
                   [_question(r, t) for r, t in zip(records, texts)])


# ============================================================================================ context
@dataclass
class EvalContext:
    """Where the work runs: one process on ``device``, or a DeepSpeed strategy over several ranks."""

    device: torch.device
    strategy: Any = None  # minillm.strategy.DeepSpeedStrategy when distributed or ZeRO-3
    zero3: bool = False
    # transformers' HfDeepSpeedConfig while it lives makes from_pretrained load straight into ZeRO-3 shards
    # (deepspeed.zero.Init), so no rank ever holds a whole copy of a model that does not fit one device.
    hf_deepspeed_config: Any = None

    @property
    def rank(self) -> int:
        return self.strategy.rank if self.strategy is not None else 0

    @property
    def world_size(self) -> int:
        return self.strategy.world_size if self.strategy is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        return self.strategy.all_gather_object(obj) if self.strategy is not None else [obj]

    def barrier(self) -> None:
        if self.strategy is not None:
            self.strategy.barrier()

    def cleanup(self, ok: bool = True) -> None:
        """``ok`` False while an exception unwinds: no barrier then (see DeepSpeedStrategy.cleanup)."""
        if self.strategy is not None:
            self.strategy.cleanup(ok)


def setup_context(settings: EvalSettings) -> EvalContext:
    """A plain device, or the DeepSpeed strategy when launched with several ranks or asked for ZeRO-3."""
    from ..config import RunConfig
    from ..strategy import DeepSpeedStrategy, _pick_device

    run = RunConfig()
    run.strategy.device = settings.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or settings.zero3:
        run.strategy.backend = "deepspeed"
        run.strategy.teacher_zero_stage = 3 if settings.zero3 else 0
        run.teacher.dtype = settings.dtype
        run.train.micro_batch_size = settings.batch_size
        strategy = DeepSpeedStrategy(run).setup()
        return EvalContext(strategy.device, strategy, settings.zero3)
    return EvalContext(_pick_device(run.strategy))


def load_frozen(path: str, settings: EvalSettings, ctx: EvalContext):
    """(model ready for inference on ctx, its module for direct calls, tokenizer)."""
    from ..config import ModelConfig
    from ..models import load_model, load_tokenizer

    cfg = ModelConfig(path=path, dtype=settings.dtype)
    tokenizer = load_tokenizer(cfg)
    if ctx.zero3 and ctx.hf_deepspeed_config is None:
        from transformers.integrations import HfDeepSpeedConfig

        ctx.hf_deepspeed_config = HfDeepSpeedConfig(ctx.strategy.ds_config(teacher=True))
    model = load_model(cfg, trainable=False)
    if ctx.strategy is not None:
        engine = ctx.strategy.prepare_teacher(model)  # replicated, or a ZeRO-3 inference engine
        module = ctx.strategy.unwrap(engine)
        if ctx.is_main:
            layout = "ZeRO-3 sharded" if ctx.strategy.is_zero3(module) else "replicated"
            print(f"[minillm-eval] {path}: {layout} over {ctx.world_size} rank(s) on {ctx.device}", flush=True)
        return module, tokenizer
    return model.to(ctx.device), tokenizer


# ============================================================================================ one seed
def shard(count: int, rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of ``range(count)``; the last rank repeats the last index so that every
    rank holds ``ceil(count / world_size)`` items (ZeRO-3 gathers and ``synced_gpus`` need equal work)."""
    per_rank = math.ceil(count / world_size)
    return [min(rank * per_rank + i, count - 1) for i in range(per_rank)]


def _progress(iterable, settings: EvalSettings, ctx: EvalContext, desc: str, total: int):
    if not settings.progress or not ctx.is_main:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def generate_for_set(model, tokenizer, eval_set: EvalSet, seed: int, settings: EvalSettings, ctx: EvalContext,
                     desc: str = ""):
    """This rank's generated batches (``GeneratedBatch``) for the set at ``seed``; positions index the prompts."""
    from torch.utils.data import DataLoader, Subset

    from .generation import generate_batches

    mine = shard(len(eval_set.prompts), ctx.rank, ctx.world_size)
    positions = PromptDataset(eval_set.prompts.prompt_ids, eval_set.prompts.references, range(len(eval_set.prompts)))
    loader = DataLoader(Subset(positions, mine), batch_size=settings.batch_size,
                        collate_fn=PromptCollator(resolve_pad_id(tokenizer)))
    # Collated up front: iterating a DataLoader draws from the global RNG, which would shift the sampling
    # stream that generate_batches seeds; this way the samples depend on the seed and the batches only.
    prompt_batches = list(loader)
    return generate_batches(model, tokenizer, _progress(prompt_batches, settings, ctx, desc, len(prompt_batches)),
                            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_k=settings.top_k, top_p=settings.top_p,
                            no_repeat_ngram_size=settings.no_repeat_ngram_size, seed=seed, rank=ctx.rank,
                            synced_gpus=ctx.zero3, device=ctx.device, engine=settings.engine)


def eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def teacher_scores(model, teacher, tokenizer, batches, ctx: EvalContext) -> list[tuple[float, int, float]]:
    """Per sampled response: (Σ teacher log p over its tokens, token count, length-normalised k3 of KL(q‖p)).

    Tokens are the response up to and including its first EOS. Both models score the sample teacher-forced at
    T = 1 (no top-k/top-p), as the MiniLLM trainer's dev evaluation does.
    """
    from ..losses import k3_reverse_kl, response_mask
    from ..generation.sampling import teacher_forced_logprobs

    out = []
    for b in batches:
        args = (b.input_ids.to(ctx.device), b.attention_mask.to(ctx.device), b.response_ids.to(ctx.device))
        mask = response_mask(args[2], eos_ids(tokenizer))
        t_lp = teacher_forced_logprobs(teacher, *args, mask)
        s_lp = teacher_forced_logprobs(model, *args, mask)
        k3 = k3_reverse_kl(s_lp, t_lp, mask)
        for row in range(len(b.texts)):
            out.append((float((t_lp[row] * mask[row]).sum()), int(mask[row].sum()), float(k3[row])))
    return out


def gather_by_position(ctx: EvalContext, positions: list[int], values: list[Any]) -> dict[int, Any]:
    """Rank 0 receives every rank's (position → value); duplicates from shard padding collapse."""
    merged: dict[int, Any] = {}
    for part in ctx.gather(list(zip(positions, values))):
        for pos, value in part:
            merged.setdefault(pos, value)
    return merged


def evaluate_seed(model, tokenizer, eval_set: EvalSet, seed: int, settings: EvalSettings, ctx: EvalContext,
                  teacher=None, desc: str = "") -> tuple[Optional[dict[str, Any]], list]:
    """Metrics and samples of one model on one set at one seed (on rank 0; None elsewhere), plus this rank's
    generated batches (reused by the analyses)."""
    batches = generate_for_set(model, tokenizer, eval_set, seed, settings, ctx, desc)
    positions = [int(p) for b in batches for p in b.index.tolist()]
    per_example: list[Any] = [t for b in batches for t in b.texts]
    if teacher is not None:
        scores = teacher_scores(model, teacher, tokenizer, batches, ctx)
        per_example = list(zip(per_example, scores))
    merged = gather_by_position(ctx, positions, per_example)
    if not ctx.is_main:
        return None, batches
    order = sorted(merged)
    texts = [merged[p][0] if teacher is not None else merged[p] for p in order]
    references = [eval_set.prompts.references[p] for p in order]
    result: dict[str, Any] = {"rougeL": rouge_l(texts, references), "exact_match": exact_match(texts, references),
                              "num": len(texts)}
    if settings.dist:
        result["dist4"] = distinct_n(texts, 4)
    if teacher is not None:
        scores = [merged[p][1] for p in order]
        tokens = sum(s[1] for s in scores)
        result["teacher_logprob"] = sum(s[0] for s in scores) / max(tokens, 1)
        result["reverse_kl_k3"] = sum(s[2] for s in scores) / len(scores)
    result["samples"] = [
        {"prompt": tokenizer.decode(eval_set.prompts.prompt_ids[p]), "output": text, "references": refs}
        for p, text, refs in zip(order, texts, references)]
    return result, batches


# ============================================================================================ aggregation
def aggregate(seed_metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """{"mean", "std", "seeds"} over seeds; std is the population std (ddof = 0, see module docstring).

    A metric missing from some seeds is averaged over the seeds that have it.
    """
    keys = [k for k in dict.fromkeys(k for m in seed_metrics.values() for k in m)]
    mean, std = {}, {}
    for key in keys:
        values = [float(m[key]) for m in seed_metrics.values() if key in m and m[key] is not None]
        if values:
            mean[key] = float(np.mean(values))
            std[key] = float(np.std(values))
    return {"mean": mean, "std": std, "seeds": seed_metrics}


def format_table(results: dict[str, Any], models: Sequence[str], sets: Sequence[str], metric: str = "rougeL",
                 digits: int = 2) -> str:
    """A markdown table: rows = models, columns = sets, cells "mean ± std" of ``metric``."""
    lines = ["| model | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for model in models:
        cells = []
        for name in sets:
            entry = results.get(model, {}).get(name, {})
            if metric in entry.get("mean", {}):
                cells.append(f"{entry['mean'][metric]:.{digits}f} ± {entry['std'][metric]:.{digits}f}")
            else:
                cells.append("–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def settings_record(settings: EvalSettings, names: list[str], sets: list[str], ctx: EvalContext,
                    data_stats: dict[str, Any]) -> dict[str, Any]:
    """The settings block of results.json: every option plus what it resolved to."""
    record = settings.to_dict()
    record.pop("progress", None)
    record.update({"model_names": dict(zip(names, settings.model)), "set_names": dict(zip(sets, settings.data)),
                   "world_size": ctx.world_size, "device": str(ctx.device), "data": list(settings.data),
                   "prompt_stats": data_stats, "std": "population (ddof=0) over seeds",
                   "do_sample": True})
    return record
