"""The reference's processed pre-training corpora: Megatron "MMIDIDX" indexed datasets (``.bin`` + ``.idx``).

The official OpenWebText (GPT-2) and RoBERTa-corpus (OPT, LLaMA) chunks are published only in this form
(``MiniLLM/openwebtext-processed``, ``MiniLLM/roberta-corpus-processed``; the raw RoBERTa corpus is not public),
so the OPT/LLaMA recipes need it to train on the paper's corpus. Written from the format's description:

``PREFIX.idx`` (little-endian)::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code of the tokens: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32, 7 float64,
              8 uint16, 9 uint32
    uint64    n, the number of items (sequences)
    uint64    m, the number of entries of the document index
    int32[n]  sizes: tokens per item
    int64[n]  pointers: byte offset of each item in PREFIX.bin
    int64[m]  document index: item numbers where documents start (0 first, n last); not needed here

``PREFIX.bin`` holds the items' tokens back to back. The reference writes each split as shards
``{split}_0``, ``{split}_1``, ... read one after the other, and its pre-training items are the chunks themselves
(every item ``max_length`` tokens of the EOS-joined document stream).

Two ways in:

- :class:`MegatronCorpus` reads such files in place (no copy) as a :class:`~minillm.data.PackedCorpus`-like
  dataset, when every item has ``seq_length`` tokens and the items lie back to back, as in the official files;
  ``data.pretrain`` may name the prefix (``.../train_0``, the shard family ``.../train``, either file, or a
  folder holding ``train_*.idx``).
- :func:`minillm.data.pretrain.import_megatron` (``minillm-data --pretrain PREFIX``) copies any such corpus
  into a packed corpus folder: the items are concatenated in order and cut into ``seq_length`` chunks (for
  the official files, the same chunks), with the tokenizer's fingerprint recorded so that the trainer can
  check it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .records import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64,
          8: np.uint16, 9: np.uint32}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8
_SAMPLE_CHUNKS = 64  # chunks whose ids are checked against the tokenizer's vocabulary


@dataclass
class MegatronIndex:
    """One ``.idx`` file, its arrays memory-mapped."""

    prefix: Path
    dtype: np.dtype
    sizes: np.ndarray      # int32 [n]
    pointers: np.ndarray   # int64 [n]
    doc_idx: np.ndarray    # int64 [m]

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


def read_index(prefix: str | os.PathLike) -> MegatronIndex:
    """Parse and validate ``prefix.idx`` against the format and ``prefix.bin``'s size."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"Megatron corpus `{prefix}`: {path} is missing (an indexed dataset is a .bin/.idx pair)")
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER)
    if len(header) < _HEADER or header[:len(MAGIC)] != MAGIC:
        raise DataError(f"{idx_path}: not a Megatron MMIDIDX index (magic {header[:len(MAGIC)]!r}, expected {MAGIC!r}); "
                        "the older TNTIDX and other formats are not supported")
    (version,) = struct.unpack_from("<Q", header, len(MAGIC))
    (code,) = struct.unpack_from("<B", header, len(MAGIC) + 8)
    n, m = struct.unpack_from("<QQ", header, len(MAGIC) + 9)
    if version != VERSION:
        raise DataError(f"{idx_path}: MMIDIDX version {version}, only version {VERSION} is known")
    if code not in DTYPES or np.dtype(DTYPES[code]).kind not in "iu":
        raise DataError(f"{idx_path}: dtype code {code} is not an integer token type (known: {sorted(DTYPES)})")
    expected = _HEADER + n * 4 + n * 8 + m * 8
    if size != expected:
        raise DataError(f"{idx_path}: {size} bytes, but its header describes {n} items and {m} document entries "
                        f"({expected} bytes); the file is truncated or not MMIDIDX")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=_HEADER)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=_HEADER + n * 4)
    doc_idx = np.frombuffer(raw, dtype=np.int64, count=m, offset=_HEADER + n * 12)
    dtype = np.dtype(DTYPES[code])
    index = MegatronIndex(Path(str(prefix)), dtype, sizes, pointers, doc_idx)
    if n and (sizes.min() < 0 or pointers.min() < 0
              or int((pointers.astype(np.int64) + sizes.astype(np.int64) * dtype.itemsize).max())
              > bin_path.stat().st_size):
        raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, too short for the items {idx_path} points at")
    return index


def _strip(source: str) -> str:
    for suffix in (".bin", ".idx"):
        if source.endswith(suffix):
            return source[: -len(suffix)]
    return source


def megatron_prefixes(source: str | os.PathLike) -> list[Path]:
    """The shard prefixes ``source`` names, in reading order, or [] when it is no Megatron corpus.

    ``source`` is a prefix (``dir/train_0``), either of its files, a shard family (``dir/train`` for
    ``dir/train_0``, ``dir/train_1``, ...) or a folder holding one family of ``{split}_{k}.idx`` shards (``train``
    is taken when several splits are there).
    """
    text = _strip(str(source))
    path = Path(text).expanduser()
    if Path(f"{path}.idx").is_file():
        return [path]
    if path.is_dir():
        if (path / "meta.json").is_file():
            return []  # a packed corpus folder
        families = sorted({p.name.rsplit("_", 1)[0] for p in path.glob("*_0.idx")})
        if not families:
            return []
        family = "train" if "train" in families else families[0]
        if len(families) > 1 and family != "train":
            raise DataError(f"{path} holds several Megatron splits ({', '.join(families)}); name one, "
                            f"e.g. {path / families[0]}")
        path = path / family
    shards = []
    while Path(f"{path}_{len(shards)}.idx").is_file():
        shards.append(Path(f"{path}_{len(shards)}"))
    return shards


def is_megatron_source(source: Optional[str]) -> bool:
    return bool(source) and bool(megatron_prefixes(source))


class _Rows:
    """[num_chunks, seq_length] rows over several memory-mapped shards, read like one array (ints, slices)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.starts[-1]), parts[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("row slices with a step are not supported")
            pieces = [self.parts[k][max(start - a, 0): min(stop - a, len(self.parts[k]))]
                      for k, a in enumerate(self.starts[:-1]) if a < stop and a + len(self.parts[k]) > start]
            return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), dtype=self.dtype)
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {key} out of range for {len(self)} chunks")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][i - self.starts[k]]

    def tolist(self) -> list:
        return self[:].tolist()


class MegatronCorpus(Dataset):
    """Official processed chunks read in place: items ``{input_ids: chunk[:-1], labels: chunk[1:], index: i}``
    (torch.long), as :class:`~minillm.data.PackedCorpus` gives them and the reference's LM loader reads them.

    Needs every item to hold the same number of tokens, stored back to back (the official files are so);
    otherwise :func:`minillm.data.pretrain.import_megatron` re-chunks the corpus into a packed folder.
    """

    def __init__(self, source: str | os.PathLike):
        prefixes = megatron_prefixes(source)
        if not prefixes:
            raise DataError(f"`{source}` is not a Megatron corpus (no PREFIX.idx, PREFIX_0.idx or folder of *_0.idx)")
        self.path = Path(_strip(str(source)))
        self.indexes = [read_index(p) for p in prefixes]
        first = self.indexes[0]
        self.dtype = first.dtype
        lengths = {int(s) for ix in self.indexes for s in (np.unique(ix.sizes) if len(ix.sizes) else [])}
        if len(lengths) != 1 or any(ix.dtype != self.dtype for ix in self.indexes):
            raise DataError(f"Megatron corpus `{source}`: items of {len(lengths)} different lengths or mixed dtypes, "
                            "so they are not fixed-length chunks; convert it with `minillm-data --tokenizer TOK "
                            f"--pretrain {source} --out DIR` (concatenates and re-chunks) and use DIR/pretrain")
        self.seq_length = lengths.pop()
        row_bytes = self.seq_length * self.dtype.itemsize
        for ix in self.indexes:
            if not np.array_equal(ix.pointers, np.arange(len(ix.sizes), dtype=np.int64) * row_bytes):
                raise DataError(f"{ix.bin_path}: items are not stored back to back; convert it with "
                                f"`minillm-data --tokenizer TOK --pretrain {source} --out DIR`")
        self.num_chunks = sum(len(ix.sizes) for ix in self.indexes)
        self.meta: dict[str, Any] = {
            "format": "megatron-mmidx", "prefixes": [str(p) for p in prefixes], "dtype": self.dtype.name,
            "seq_length": self.seq_length, "num_chunks": self.num_chunks, "tokenizer": None}
        self._tokens: Optional[_Rows] = None

    @property
    def tokens(self) -> _Rows:
        """[num_chunks, seq_length] read-only rows (memory maps of the shards' .bin files)."""
        if self._tokens is None:
            self._tokens = _Rows([np.memmap(ix.bin_path, dtype=self.dtype, mode="r",
                                            shape=(len(ix.sizes), self.seq_length)) for ix in self.indexes])
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        state["indexes"] = [str(ix.prefix) for ix in self.indexes]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.indexes = [read_index(p) for p in state["indexes"]]

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i: int) -> dict[str, Any]:
        chunk = torch.from_numpy(np.asarray(self.tokens[i], dtype=np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "index": i}

    def check_tokenizer(self, tokenizer) -> None:
        """The files carry no tokenizer, so only what can be seen is checked: the ids of up to 64 chunks spread
        over the corpus must lie inside ``tokenizer``'s vocabulary (GPT-2 ids in a LLaMA run fail here; two
        vocabularies of the same size would not)."""
        check_ids(self.tokens, len(tokenizer), str(self.path))


def check_ids(rows, vocab_size: int, where: str) -> None:
    n = len(rows)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, _SAMPLE_CHUNKS))}) if n else []
    top = max((int(np.asarray(rows[i]).max()) for i in picks), default=-1)
    low = min((int(np.asarray(rows[i]).min()) for i in picks), default=0)
    if top >= vocab_size or low < 0:
        raise DataError(f"Megatron corpus `{where}` holds token id {top if top >= vocab_size else low}, outside the "
                        f"tokenizer's {vocab_size} ids: it was tokenised with another model family's tokenizer")


def item_stream(indexes: list[MegatronIndex]) -> Iterator[np.ndarray]:
    for ix in indexes:
        data = np.memmap(ix.bin_path, dtype=ix.dtype, mode="r")
        for pointer, size in zip(ix.pointers.tolist(), ix.sizes.tolist()):
            start = pointer // ix.dtype.itemsize
            yield np.asarray(data[start:start + size], dtype=np.int64)


__all__ = ["MegatronCorpus", "MegatronIndex", "is_megatron_source", "item_stream", "megatron_prefixes",
           "read_index", "MAGIC", "DTYPES"]
