"""``minillm-generate``: sample a model's (the teacher's) responses to instruction prompts into SeqKD JSONL.

Output: one ``{"prompt", "output", "index"}`` line per kept record, in record order, where ``prompt`` is the
rendered prompt exactly as it was tokenised and ``index`` the record's position in the source; so
``method: seqkd`` with ``data.train=OUT.jsonl`` (template auto) trains on it directly. Prompts longer than
``max_prompt_length`` tokens are dropped and counted, as training drops them (lmops-notes §6). The sidecar
``OUT.jsonl.meta.json`` records the model, the data, every sampling setting, the seed and the counts.

Dev split (``dev_num``): as the reference, the teacher samples only the training records, and SeqKD's dev set
(which picks its checkpoint by dev Rouge-L) is the gold one. The first ``dev_num`` records of the source
(default: 1000 for the named set ``dolly``, the reference's dev split; 0 otherwise) are not sampled; they are
written with their gold references to ``dev_out`` (default ``dev.jsonl`` beside OUT), so the recipe trains with
``data.train=OUT.jsonl data.dev=<dev_out> data.dev_num=0``. ``index`` stays the record's position in the
source, so the train file starts at ``index == dev_num``. ``num`` limits the training records.

Resume: the prompts are cut into fixed chunks of ``batch_size`` (by position among the kept prompts) and chunk
k is sampled with ``torch.manual_seed(seed + k · CHUNK_SEED_STRIDE)``. A re-run regenerates only the chunks
that have missing records and appends only those records, so an interrupted-and-resumed file is identical to
an uninterrupted one (on the same hardware). A partially written last line is discarded; a run whose
settings differ from the sidecar's fails unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import UserError
from .settings import engine_conflict

FORMAT = "minillm-generate/1"
CHUNK_SEED_STRIDE = 100_003  # a prime: chunk seeds of nearby --seed values do not coincide for 100k chunks


class GenerateError(UserError, ValueError):
    """Bad settings or an output file that cannot be resumed."""


@dataclass
class GenerateSettings:
    """What ``minillm-generate`` samples; every field except ``device`` must match the sidecar to resume."""

    model: str
    data: str
    split: str = "train"
    template: str = "auto"
    max_prompt_length: int = 256
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 10
    batch_size: int = 16
    num: int = -1
    dtype: str = "fp32"
    cache_dir: str = ".cache/minillm"
    engine: str = "auto"  # minillm.evaluation.generation.resolve_engine
    dev_num: Optional[int] = None  # records at the start of the source kept as gold dev (None: dolly 1000, else 0)
    dev_out: Optional[str] = None  # where they go (None: dev.jsonl beside the output)

    def comparable(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cache_dir")
        d.pop("dev_out")
        return d


DOLLY_DEV_NUM = 1000  # the reference's Dolly dev split: the first 1000 records of raw.jsonl


def resolve_dev_num(settings: GenerateSettings) -> int:
    """``dev_num``, or its default: the reference's 1000 for the named set ``dolly``, 0 for anything else."""
    if settings.dev_num is not None:
        return settings.dev_num
    return DOLLY_DEV_NUM if settings.data == "dolly" else 0


def dev_path(out: Path, settings: GenerateSettings) -> Path:
    """Where the gold dev records go; never the output file itself."""
    path = Path(settings.dev_out) if settings.dev_out else out.with_name("dev.jsonl")
    if path.resolve() == out.resolve():
        raise GenerateError(f"the gold dev records would overwrite the output {out}; pass --dev-out FILE "
                            "(or name the output something other than dev.jsonl)")
    return path


def write_gold_dev(records, tokenizer, template: str, path: Path) -> int:
    """The dev records as ``{"prompt", "output", "index"}`` lines with their gold references (one string, or the
    list when a record has several), written atomically; returns how many."""
    from ..data.templates import render_prompt

    lines = []
    for index, record in enumerate(records):
        if not record.references:
            raise GenerateError(f"{record.where}: dev record {index} has no reference response; the gold dev "
                                "set needs one (or pass --dev-num 0 and give the trainer its own data.dev)")
        refs = record.references
        lines.append(json.dumps({"prompt": render_prompt(record, tokenizer, template),
                                 "output": refs[0] if len(refs) == 1 else list(refs), "index": index},
                                ensure_ascii=False) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
    return len(lines)


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    path = meta_path(out)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)


def read_existing(out: Path) -> set[int]:
    """Indices already in ``out``; a partially written last line is cut off the file first."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # the last line never got its newline: an interrupted write
        with open(out, "r+b") as f:
            f.truncate(end)
        raw = raw[:end]
    done = set()
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):
            raise GenerateError(f"{out}:{number}: not a minillm-generate record (no JSON with `index`); "
                                "pass --overwrite to start the file again") from None
    return done


def _check_resume(out: Path, settings: GenerateSettings, overwrite: bool) -> None:
    meta = meta_path(out)
    if overwrite:
        for path in (out, meta):
            if path.exists():
                path.unlink()
        return
    if meta.exists():
        old = json.loads(meta.read_text()).get("settings", {})
        old.setdefault("dev_num", 0)  # sidecars from before the dev split sampled every record
        new = settings.comparable()
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise GenerateError(f"{out} was written with other settings ({listing}); re-run with the same ones to "
                                "resume, or pass --overwrite to start again")
    elif out.exists() and out.stat().st_size > 0:
        raise GenerateError(f"{out} exists without its sidecar {meta.name}, so it cannot be resumed safely; pass "
                            "--overwrite to replace it or choose another --out")


def generate_seqkd_data(settings: GenerateSettings, out: str | os.PathLike, *, device: str = "auto",
                        overwrite: bool = False, progress: bool = True,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample the missing records of ``out`` (module docstring); returns the sidecar's content."""
    import torch

    from ..config import ModelConfig, StrategyConfig
    from ..data import PromptCollator, build_prompt_dataset, load_records, resolve_pad_id
    from ..models import load_model, load_tokenizer
    from ..strategy import _pick_device
    from .generation import generate_batches

    out = Path(out)
    if settings.batch_size < 1 or settings.max_new_tokens < 1 or settings.max_prompt_length < 1:
        raise GenerateError("--batch-size, --max-new-tokens and --max-prompt-length must be ≥ 1")
    settings = replace(settings, dev_num=resolve_dev_num(settings))
    if settings.dev_num < 0:
        raise GenerateError(f"--dev-num must be ≥ 0, got {settings.dev_num}")
    dev_file = dev_path(out, settings) if settings.dev_num else None
    conflict = engine_conflict(settings.engine, no_repeat_ngram_size=settings.no_repeat_ngram_size)
    if conflict:
        raise GenerateError(conflict)
    _check_resume(out, settings, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_existing(out)

    model_cfg = ModelConfig(path=settings.model, dtype=settings.dtype)
    tokenizer = load_tokenizer(model_cfg)
    records = load_records(settings.data, split=settings.split, cache_dir=settings.cache_dir, require_response=False)
    total = len(records)
    offset = settings.dev_num  # output indices are positions in the source
    if offset >= total:
        raise GenerateError(f"{settings.data} has {total} records, not more than --dev-num {offset}; nothing would "
                            "be left to sample")
    dev_records, records = records[:offset], records[offset:]
    if 0 <= settings.num < len(records):
        records = records[: settings.num]
    prompts, stats = build_prompt_dataset(records, tokenizer, template=settings.template,
                                          max_prompt_length=settings.max_prompt_length, overflow="drop",
                                          name="generate")
    from ..data.templates import render_prompt

    meta: dict[str, Any] = {
        "format": FORMAT, "settings": settings.comparable(),
        "sampling": {"do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k,
                     "top_p": settings.top_p, "no_repeat_ngram_size": settings.no_repeat_ngram_size,
                     "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
                     "chunk_seed": f"torch.manual_seed(seed + k * {CHUNK_SEED_STRIDE}) for chunk k of batch_size "
                                   "kept prompts"},
        "counts": {"records_in_source": total, "records_used": len(records), "prompts": len(prompts),
                   "dropped": dict(stats.dropped), "written": len(done), "complete": False},
    }
    if dev_file is not None:
        written = write_gold_dev(dev_records, tokenizer, settings.template, dev_file)
        meta["dev"] = {"file": str(dev_file), "records": written, "source_indices": [0, offset],
                       "note": "gold references of the first dev_num records; not sampled (train with "
                               "data.dev=<file> data.dev_num=0)"}
        log(f"[minillm-generate] gold dev set: the first {written} records of {settings.data} -> {dev_file}")
    _write_meta(out, meta)
    wanted = [p for p in range(len(prompts)) if offset + prompts.indices[p] not in done]
    chunks = sorted({p // settings.batch_size for p in wanted})
    log(f"[minillm-generate] {len(prompts)} prompts ({stats.num_dropped} dropped: {dict(stats.dropped)}), "
        f"{len(done)} already in {out}, {len(wanted)} to sample in {len(chunks)} batches")
    if chunks:
        device_t = _pick_device(StrategyConfig(device=device))
        model = load_model(model_cfg, trainable=False, device=device_t)
        collate = PromptCollator(resolve_pad_id(tokenizer))
        bar = chunks
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(chunks, desc="minillm-generate", dynamic_ncols=True)
        with open(out, "a", encoding="utf-8") as f:
            for k in bar:
                positions = range(k * settings.batch_size, min((k + 1) * settings.batch_size, len(prompts)))
                batch = collate([prompts[p] for p in positions])
                (got,) = generate_batches(model, tokenizer, [batch], max_new_tokens=settings.max_new_tokens,
                                          temperature=settings.temperature, top_k=settings.top_k,
                                          top_p=settings.top_p, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                                          seed=settings.seed + k * CHUNK_SEED_STRIDE, device=device_t,
                                          engine=settings.engine)
                for p, text in zip(positions, got.texts):
                    index = offset + prompts.indices[p]
                    if index in done:
                        continue
                    prompt = render_prompt(records[prompts.indices[p]], tokenizer, settings.template)
                    f.write(json.dumps({"prompt": prompt, "output": text, "index": index}, ensure_ascii=False) + "\n")
                    done.add(index)
                f.flush()
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    meta["counts"].update(written=len(done), complete=len(done) >= len(prompts))
    _write_meta(out, meta)
    log(f"[minillm-generate] {out}: {len(done)} records; sidecar {meta_path(out).name}")
    return meta


def settings_from_args(args: dict[str, Any]) -> GenerateSettings:
    names = set(GenerateSettings.__dataclass_fields__)
    return GenerateSettings(**{k: v for k, v in args.items() if k in names})


__all__ = ["GenerateError", "GenerateSettings", "generate_seqkd_data", "meta_path", "read_existing", "resolve_dev_num",
           "DOLLY_DEV_NUM",
           "settings_from_args", "CHUNK_SEED_STRIDE", "FORMAT"]
