"""The teacher's distributions on an SFT/KD training set, computed once offline (``kd.teacher_cache``).

Word-level KD and SeqKD train on fixed sequences for many epochs (10 to 20 in the paper's recipes), and the
teacher's distribution at each response position never changes, so running the teacher at every micro-step
repeats the same forward once per epoch. The cache stores it once, as top-k rows (:mod:`minillm.losses.topk`: the tail
mass spread evenly over the other entries, exact when k equals the vocabulary), and the trainer then never
holds the teacher on a GPU.

Only the positions the loss covers (labels ≠ −100: the response and its EOS) are stored, in dataset order, as one
flat ragged array. Layout of a cache folder (written to a temporary folder, then renamed):

- ``teacher_topk.json``: format, k, vocabulary size, storage dtype, example and position counts, the training
  set's fingerprint (a hash of every example's token ids and prompt length: the cache only fits the exact data,
  template, truncation and tokenizer it was built from), the teacher's path;
- ``offsets.npy`` int64 [num_examples + 1]: example i owns rows offsets[i]:offsets[i + 1];
- ``topk_ids.npy`` int32 [num_positions, k] and ``topk_logprobs.npy`` float16/float32 [num_positions, k].
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..losses.topk import TopKLogprobs
from .collate import IGNORE_INDEX, SFTCollator
from .instruction import SFTDataset
from .records import DataError
from .teacher_cache import META_FILE, STORAGE, commit_cache, open_topk_arrays, read_cache_meta

FORMAT = "minillm-teacher-topk-sft-v1"

__all__ = ["dataset_fingerprint", "build_response_topk_cache", "ResponseTopKCache"]


def dataset_fingerprint(dataset: SFTDataset) -> str:
    """sha256 over every example's token ids and prompt length, in order."""
    digest = hashlib.sha256()
    for ex in dataset.examples:
        digest.update(np.asarray(ex.ids, dtype=np.int64).tobytes())
        digest.update(int(ex.prompt_length).to_bytes(8, "little"))
    return digest.hexdigest()


def _loss_positions(dataset: SFTDataset) -> np.ndarray:
    """Positions per example that the loss covers (labels ≠ −100), from the items the trainer sees."""
    return np.array([int((dataset[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(dataset))], dtype=np.int64)


@torch.no_grad()
def build_response_topk_cache(dataset: SFTDataset, teacher, out_dir: str | os.PathLike, *, top_k: int,
                              pad_token_id: int, batch_size: int = 8, storage: str = "fp16",
                              device: torch.device | str | None = None,
                              trim: Callable[[Tensor], Tensor] = lambda x: x, autocast=None, progress: bool = False,
                              teacher_name: str = "") -> Path:
    """Run ``teacher`` once over every example of ``dataset`` (the trainer's ``data.train``) and store its top-k
    log-probs at the positions the loss covers. ``trim`` cuts padded vocabulary rows, as the trainers do.
    Returns the cache folder; an existing one is replaced only when the new one is complete."""
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {sorted(STORAGE)}, got {storage!r}")
    if len(dataset) == 0:
        raise DataError("build_response_topk_cache: the training set is empty")
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    counts = _loss_positions(dataset)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    np.save(tmp / "offsets.npy", offsets)
    collate = SFTCollator(pad_token_id)
    was_training = teacher.training
    teacher.eval()
    ids_map = logp_map = None
    vocab = None
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="teacher top-k", unit="batch")
    for start in starts:
        rows = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate([dataset[i] for i in rows])
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            logits = teacher(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits
        logp = torch.log_softmax(trim(logits).float(), dim=-1)
        if vocab is None:
            vocab = logp.shape[-1]
            if not 1 <= top_k <= vocab:
                raise ValueError(f"top_k={top_k} must lie in [1, {vocab}] (the teacher's vocabulary)")
            ids_map, logp_map = open_topk_arrays(tmp, (int(offsets[-1]), top_k), storage)
        valid = (batch["labels"] != IGNORE_INDEX).to(logp.device)
        values, indices = logp[valid].topk(top_k, dim=-1)  # [positions of the batch, k], row-major = dataset order
        lo, hi = int(offsets[rows[0]]), int(offsets[rows[-1] + 1])
        ids_map[lo:hi] = indices.cpu().numpy().astype(np.int32)
        logp_map[lo:hi] = values.cpu().numpy().astype(STORAGE[storage])
    teacher.train(was_training)
    meta = {"format": FORMAT, "top_k": top_k, "vocab_size": vocab, "storage": storage,
            "num_examples": len(dataset), "num_positions": int(offsets[-1]),
            "fingerprint": dataset_fingerprint(dataset), "teacher": teacher_name}
    return commit_cache(tmp, out, meta, (ids_map, logp_map))


class ResponseTopKCache:
    """A cache folder written by :func:`build_response_topk_cache`, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = read_cache_meta(self.path, FORMAT, "minillm-teacher-cache --config RUN.yaml --top-k K --out DIR")
        self.offsets = np.load(self.path / "offsets.npy")
        self.ids = np.load(self.path / "topk_ids.npy", mmap_mode="r")
        self.logprobs = np.load(self.path / "topk_logprobs.npy", mmap_mode="r")
        self.vocab_size = int(self.meta["vocab_size"])
        self.top_k = int(self.meta["top_k"])

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def check(self, dataset: SFTDataset, vocab_size: int) -> None:
        """Fail clearly unless the cache was built from exactly this training set and vocabulary."""
        where = self.path / META_FILE
        if int(self.meta["num_examples"]) != len(dataset):
            raise DataError(f"{where}: built for {self.meta['num_examples']} training examples, but the run has "
                            f"{len(dataset)}; rebuild it with `minillm-teacher-cache --config` for this run")
        if int(self.meta["vocab_size"]) != int(vocab_size):
            raise DataError(f"{where}: vocab_size={self.meta['vocab_size']}, but the run has {vocab_size}; rebuild "
                            "it for this teacher and tokenizer")
        if self.meta["fingerprint"] != dataset_fingerprint(dataset):
            raise DataError(f"{where}: the training set differs from the one the cache was built from (data, "
                            "template, truncation or tokenizer changed); rebuild it with `minillm-teacher-cache "
                            "--config` for this run")

    def topk(self, indices: Sequence[int] | Tensor, labels: Tensor) -> TopKLogprobs:
        """The teacher's top-k rows for a collated micro-batch: ``indices`` [B] are the examples' positions in the
        training set, ``labels`` [B, T] the batch's labels. Positions the loss ignores hold a uniform row."""
        labels = labels.detach().cpu()
        batch, width = labels.shape
        k = self.top_k
        ids = torch.arange(k, dtype=torch.int32).expand(batch, width, k).clone()
        logprobs = torch.full((batch, width, k), -math.log(self.vocab_size), dtype=torch.float32)
        for row, index in enumerate(int(i) for i in indices):
            lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
            valid = (labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
            if valid.numel() != hi - lo:
                raise DataError(f"{self.path}: example {index} has {hi - lo} cached positions but the batch has "
                                f"{valid.numel()} loss positions; the cache does not belong to this data")
            ids[row, valid] = torch.from_numpy(np.array(self.ids[lo:hi]))
            logprobs[row, valid] = torch.from_numpy(np.array(self.logprobs[lo:hi], dtype=np.float32))
        return TopKLogprobs(ids, logprobs, self.vocab_size)
