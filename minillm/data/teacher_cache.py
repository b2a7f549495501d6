"""The teacher's outputs on the pre-training corpus, computed once offline and read back (DESIGN §7).

The PT loss's KD half, −Σ_v p_v log q_v on a corpus chunk, needs the teacher's distribution at every position. The
corpus is fixed data, so instead of a teacher forward at every MiniLLM micro-step the distributions can be computed
once and stored, the way off-policy KD caches do. Full rows cost V values per position, so the cache keeps the
teacher's **top-k** log-probs and ids per position; reading back, the remaining mass p_tail = 1 − Σ_topk p_v is
spread evenly over the V − k other entries (:func:`expand_topk`). That is a documented approximation of the
teacher's tail; with k = V nothing is dropped and the loss is the online one to storage precision (fp32 storage:
fp32 rounding).

Layout of a cache folder (written to a temporary folder, then renamed, so a crash leaves no half cache):

- ``teacher_topk.json``: format, k, vocabulary size, storage dtype, the corpus' chunk count and sequence length,
  the teacher's path;
- ``topk_ids.npy`` int32 [num_chunks, seq_length − 1, k] and ``topk_logprobs.npy`` float16/float32 [same]: row t of
  a chunk is the teacher's distribution predicting ``labels[t]`` (= chunk[t + 1]), as :class:`PackedCorpus` items.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..losses.topk import TopKLogprobs, expand_topk
from .pretrain import PackedCorpus
from .records import DataError

META_FILE = "teacher_topk.json"
FORMAT = "minillm-teacher-topk-v1"
STORAGE = {"fp16": np.float16, "fp32": np.float32}


def open_topk_arrays(folder: Path, shape: tuple[int, ...], storage: str) -> tuple[np.memmap, np.memmap]:
    """The two memory-mapped arrays of a cache being written: ``topk_ids.npy`` int32 and ``topk_logprobs.npy``."""
    ids = np.lib.format.open_memmap(folder / "topk_ids.npy", mode="w+", dtype=np.int32, shape=shape)
    logprobs = np.lib.format.open_memmap(folder / "topk_logprobs.npy", mode="w+", dtype=STORAGE[storage], shape=shape)
    return ids, logprobs


def commit_cache(tmp: Path, out: Path, meta: dict[str, Any], arrays: Sequence[np.memmap]) -> Path:
    """Flush ``arrays``, write the metadata last and move the finished folder into place (replacing ``out``)."""
    for array in arrays:
        array.flush()
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def read_cache_meta(path: Path, expected_format: str, build_hint: str) -> dict[str, Any]:
    """A cache folder's metadata, checked to be of ``expected_format``; errors name the folder and how to build."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(f"`{path}` is not a teacher top-k cache (no {META_FILE}); build it with `{build_hint}`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != expected_format:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {expected_format!r}: this cache is of "
                        f"another kind (minillm.pt_teacher_cache takes `minillm-teacher-cache --corpus` caches, "
                        f"kd.teacher_cache `minillm-teacher-cache --config` ones); build one with `{build_hint}`")
    return meta


def corpus_fingerprint(corpus) -> str:
    """sha256 over the corpus's token ids ([num_chunks, seq_length] ``corpus.tokens``, as int64, in order): a cache of
    the same shape built from another corpus, another packing or another tokenizer does not match."""
    digest = hashlib.sha256()
    tokens = corpus.tokens
    for start in range(0, len(tokens), 4096):  # blocks of chunks: the memory map is never read whole
        digest.update(np.ascontiguousarray(np.asarray(tokens[start:start + 4096]), dtype=np.int64).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def build_teacher_topk_cache(corpus: PackedCorpus, teacher, out_dir: str | os.PathLike, *, top_k: int,
                             batch_size: int = 8, storage: str = "fp16", device: torch.device | str | None = None,
                             trim: Callable[[Tensor], Tensor] = lambda x: x, autocast=None,
                             progress: bool = False, teacher_name: str = "") -> Path:
    """Run ``teacher`` over every chunk of ``corpus`` once and store its top-k log-probs per position.

    ``trim`` cuts padded vocabulary rows (:class:`minillm.models.VocabAlignment`), as the trainers do.
    Returns the cache folder. An existing folder is replaced only when complete (temp folder, then rename).
    """
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {sorted(STORAGE)}, got {storage!r}")
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    n, length = len(corpus), corpus.seq_length - 1
    was_training = teacher.training
    teacher.eval()
    ids_map = logp_map = None
    vocab = None
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="teacher top-k", unit="batch")
    for start in chunks:
        inputs = torch.stack([corpus[i]["input_ids"] for i in range(start, min(start + batch_size, n))]).to(device)
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            logits = trim(teacher(input_ids=inputs).logits).float()
        logp = torch.log_softmax(logits, dim=-1)
        if vocab is None:
            vocab = logp.shape[-1]
            if not 1 <= top_k <= vocab:
                raise ValueError(f"top_k={top_k} must lie in [1, {vocab}] (the teacher's vocabulary)")
            ids_map, logp_map = open_topk_arrays(tmp, (n, length, top_k), storage)
        values, indices = logp.topk(top_k, dim=-1)
        ids_map[start:start + len(inputs)] = indices.cpu().numpy().astype(np.int32)
        logp_map[start:start + len(inputs)] = values.cpu().numpy().astype(STORAGE[storage])
    teacher.train(was_training)
    meta = {"format": FORMAT, "top_k": top_k, "vocab_size": vocab, "storage": storage, "num_chunks": n,
            "seq_length": corpus.seq_length, "corpus": str(corpus.path), "teacher": teacher_name,
            "fingerprint": corpus_fingerprint(corpus)}
    return commit_cache(tmp, out, meta, (ids_map, logp_map))


class TeacherTopKCache:
    """A cache folder written by :func:`build_teacher_topk_cache`, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = read_cache_meta(self.path, FORMAT,
                                    "minillm-teacher-cache --corpus DIR --teacher DIR --top-k K --out DIR")
        self.ids = np.load(self.path / "topk_ids.npy", mmap_mode="r")
        self.logprobs = np.load(self.path / "topk_logprobs.npy", mmap_mode="r")

    def __len__(self) -> int:
        return int(self.meta["num_chunks"])

    def check(self, corpus: PackedCorpus, vocab_size: int, teacher_path: str | None = None) -> list[str]:
        """Fail clearly unless the cache was built from exactly this corpus (token fingerprint) and vocabulary.
        Returns warnings: a cache built from another teacher path (weights are not fingerprinted)."""
        where = self.path / META_FILE
        for key, want in (("num_chunks", len(corpus)), ("seq_length", corpus.seq_length), ("vocab_size", vocab_size)):
            if int(self.meta[key]) != int(want):
                raise DataError(f"{where}: {key}={self.meta[key]}, but the run has {want}; rebuild the cache for "
                                "this corpus and teacher (minillm.pt_teacher_cache)")
        if self.meta.get("fingerprint") is None:
            raise DataError(f"{where}: the cache has no corpus fingerprint (built by an older minillm), so it cannot "
                            "be matched to this corpus; rebuild it with minillm-teacher-cache")
        if self.meta["fingerprint"] != corpus_fingerprint(corpus):
            raise DataError(f"{where}: built from other tokens than the corpus `{corpus.path}` (same shape, different "
                            "text, packing or tokenizer); rebuild it for this corpus (minillm.pt_teacher_cache)")
        built = self.meta.get("teacher") or ""
        if teacher_path and built and built != teacher_path:
            return [f"minillm.pt_teacher_cache {self.path} was built from teacher {built} but teacher.path is "
                    f"{teacher_path}; rebuild it if the teacher changed (weights are not fingerprinted)"]
        return []

    def topk(self, chunk_indices: Sequence[int] | Tensor) -> TopKLogprobs:
        """The top-k rows of the given chunks as :class:`TopKLogprobs` [B, seq_length − 1, k] on the CPU: the
        chunked losses expand them chunk by chunk on the student's device."""
        rows = [int(i) for i in chunk_indices]
        ids = torch.from_numpy(np.stack([self.ids[i] for i in rows]))
        logp = torch.from_numpy(np.stack([self.logprobs[i] for i in rows]))
        return TopKLogprobs(ids, logp, int(self.meta["vocab_size"]))

    def dense(self, chunk_indices: Sequence[int] | Tensor, device: torch.device | str = "cpu") -> Tensor:
        """[B, seq_length − 1, V] fp32 teacher log-probs of the given chunks (see :func:`expand_topk`)."""
        return self.topk(chunk_indices).dense(device)


__all__ = ["build_teacher_topk_cache", "corpus_fingerprint", "expand_topk", "TeacherTopKCache", "open_topk_arrays", "commit_cache",
           "read_cache_meta"]
