"""The pre-training corpus of the PT loss: packing text into fixed-length token chunks on disk.

Documents are tokenised without special tokens, each followed by EOS, concatenated, and cut into chunks of
``seq_length`` tokens (the tail that does not fill a chunk is dropped and counted), as the reference's
``process_data_pretrain.py`` does. A document is shaped as the reference's pipeline shapes it
(:func:`reference_document`): ``get_openwebtext.py`` collapses every run of newlines into one marker and writes
the document as one line; ``process_data_pretrain.py`` turns the markers back into "\\n" and encodes the line
*with* its line terminator, so every document ends with "\\n" before its EOS. The chunks are one flat memory-mapped file (``tokens.bin``; uint16 when
the vocabulary has fewer than 65,535 entries, else int32) plus ``meta.json``, so 20M chunks need no RAM.
Both files are written under temporary names and renamed; ``meta.json`` comes last, so a folder with a
``meta.json`` is a complete corpus.

Text sources: text files (one document per line, already in the dump's form: ``<@x(x!>`` is turned back
into "\\n" and the line's "\\n" is kept, nothing else is collapsed), ``.jsonl`` files (``text_field``) and HF
dataset ids (streamed), whose raw texts get the whole treatment (runs of "\\n" collapsed, "\\n" appended), a glob
or a folder of such files. Two small differences from the reference remain, both absent from OpenWebText: a
blank document is skipped (the reference would encode "\\n" + EOS), and a bare "\\r" does not split a document
(the reference's text-mode read of its dump starts a new line there).

The reference's processed corpora (Megatron ``.bin``/``.idx`` files) are read directly, without re-packing,
by :mod:`minillm.data.megatron`; ``data.pretrain`` may name their prefix.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .megatron import MegatronCorpus, is_megatron_source, item_stream, megatron_prefixes, read_index
from .records import DataError, hub_unreachable_error, looks_like_hub_id

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
FORMAT = "minillm-packed-corpus"
NEWLINE_MARKER = "<@x(x!>"  # the reference's in-document newline escape (get_openwebtext.py)
TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json")
# Version of the document shaping; part of the cache key, so corpora packed before the reference's "\n" + EOS
# ending and newline collapsing are packed again rather than reused.
DOCUMENT_FORMAT = 2
_NEWLINE_RUN = re.compile(r"\n+")


def reference_document(text: str) -> str:
    """A raw document as the reference's pipeline feeds it to the tokenizer: runs of "\\n" collapsed into one
    (get_openwebtext.py), then the dump line's own "\\n" (process_data_pretrain.py encodes the line with it).

    So "a\\n\\n\\nb" becomes "a\\nb\\n", and "a\\n" becomes "a\\n\\n" (its final newline is a run of its own).
    """
    return _NEWLINE_RUN.sub("\n", text) + "\n"
_DOC_BATCH = 1000


# ----------------------------------------------------------------------------------------- sources
def resolve_sources(sources: str | Sequence[str]) -> list[str]:
    """Expand globs and folders into a sorted list of files; hub ids are kept as they are."""
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise DataError("no pre-training sources given")
    out: list[str] = []
    for item in map(str, items):
        path = Path(item).expanduser()
        if path.is_file():
            out.append(str(path.resolve()))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise DataError(f"pre-training folder `{item}` holds no {'/'.join(TEXT_SUFFIXES)} files")
            out.extend(str(p.resolve()) for p in files)
        elif any(c in item for c in "*?["):
            files = sorted(p for p in globlib.glob(item, recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"pre-training glob `{item}` matches no file")
            out.extend(str(Path(p).resolve()) for p in files)
        elif looks_like_hub_id(item):
            out.append(item)
        else:
            raise DataError(f"pre-training source `{item}` does not exist (expected a text/.jsonl file, a folder, "
                            "a glob or an HF dataset id owner/name)")
    return out


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        if path.suffix in (".jsonl", ".json"):
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: malformed JSON ({e.msg}); pre-training .json/.jsonl files "
                                    "hold one object per line") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise DataError(f"{path}:{number}: missing field `{text_field}` "
                                    "(set data.pretrain_text_field to the field holding the text)")
                if not isinstance(obj[text_field], str):
                    raise DataError(f"{path}:{number}: field `{text_field}` must be a string")
                if obj[text_field].strip():
                    yield reference_document(obj[text_field])
        else:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line.replace(NEWLINE_MARKER, "\n") + "\n"


def _hub_documents(hub_id: str, text_field: str) -> Iterator[str]:
    try:
        import datasets

        stream = datasets.load_dataset(hub_id, split="train", streaming=True)
        rows = iter(stream)
        first = next(rows, None)
    except Exception as e:
        raise hub_unreachable_error(hub_id, e, "corpus.jsonl") from e
    if first is not None and text_field not in first:
        raise DataError(f"hub dataset `{hub_id}` has no field `{text_field}` (fields: {', '.join(first)}); "
                        "set data.pretrain_text_field")
    for row in ([first] if first is not None else []):
        if row[text_field].strip():
            yield reference_document(row[text_field])
    for row in rows:
        if row[text_field].strip():
            yield reference_document(row[text_field])


def iter_documents(sources: str | Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Every non-blank document of the sources, in order, shaped as the reference's (module docstring)."""
    for source in resolve_sources(sources):
        if Path(source).is_file():
            yield from _file_documents(Path(source), text_field)
        else:
            yield from _hub_documents(source, text_field)


# ----------------------------------------------------------------------------------------- identity
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits below 65,535, else int32 (as the reference's binary format)."""
    return np.dtype(np.uint16) if vocab_size < 65535 else np.dtype(np.int32)


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Name, vocabulary size and a hash of the vocabulary: two tokenizers that agree here encode alike."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {"tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
            "vocab_hash": digest, "eos_token_id": tokenizer.eos_token_id}


def corpus_key(sources: str | Sequence[str], tokenizer, seq_length: int, text_field: str = "text") -> str:
    """Cache key of a packed corpus: the resolved sources (with file sizes and modification times, so an
    edited file is re-packed), the tokenizer's vocabulary and the chunk length."""
    described = []
    for source in resolve_sources(sources):
        path = Path(source)
        if path.is_file():
            st = path.stat()
            described.append([source, st.st_size, st.st_mtime_ns])
        else:
            described.append([source])
    fp = tokenizer_fingerprint(tokenizer)
    payload = {"sources": described, "vocab_size": fp["vocab_size"], "vocab_hash": fp["vocab_hash"],
               "eos": fp["eos_token_id"], "seq_length": seq_length, "text_field": text_field, "format": FORMAT,
               "documents": DOCUMENT_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- packing
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _token_batches(docs: Iterable[str], tokenizer) -> Iterator[list[list[int]]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _DOC_BATCH:
            yield tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch = []
    if batch:
        yield tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


class _ChunkWriter:
    """Cuts a token stream into ``seq_length``-token rows of ``out/tokens.bin``: written under a temporary name,
    renamed into place by :meth:`commit`, removed if anything fails first. The old ``meta.json`` goes at once, so
    it never describes the new token file."""

    def __init__(self, out: Path, dtype: np.dtype, seq_length: int, max_chunks: Optional[int]):
        out.mkdir(parents=True, exist_ok=True)
        if (out / META_FILE).exists():
            (out / META_FILE).unlink()
        self.out, self.dtype, self.seq_length, self.max_chunks = out, dtype, seq_length, max_chunks
        self.tmp = out / f".{TOKENS_FILE}.tmp-{socket.gethostname()}-{os.getpid()}"
        self.digest = hashlib.sha256()
        self.carry = np.zeros(0, dtype=np.int64)
        self.num_chunks = self.tokens_read = 0
        self.stopped_early = False
        self._file = None

    def __enter__(self) -> "_ChunkWriter":
        self._file = open(self.tmp, "wb")
        return self

    def add(self, pieces: list[np.ndarray]) -> bool:
        """Append ``pieces`` to the stream and write every full row; True once ``max_chunks`` rows are written."""
        stream = np.concatenate([self.carry, *pieces])
        self.tokens_read += len(stream) - len(self.carry)
        full = len(stream) // self.seq_length
        if self.max_chunks is not None:
            full = min(full, self.max_chunks - self.num_chunks)
        data = stream[: full * self.seq_length].astype(self.dtype).tobytes()
        self._file.write(data)
        self.digest.update(data)
        self.num_chunks += full
        self.carry = stream[full * self.seq_length:]
        self.stopped_early = self.max_chunks is not None and self.num_chunks >= self.max_chunks
        return self.stopped_early

    def commit(self) -> None:
        self._file.close()
        os.replace(self.tmp, self.out / TOKENS_FILE)

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self._file.close()
        if self.tmp.exists():
            self.tmp.unlink()

    def write_meta(self, fingerprint: dict[str, Any], **fields: Any) -> "PackedCorpus":
        """Write ``meta.json`` (last, atomically: its presence marks a complete corpus) with the fields every packed
        corpus has, the tokenizer's ``fingerprint`` and the caller's own ``fields``; return the corpus."""
        meta = {"format": FORMAT, "version": 1, "dtype": self.dtype.name, "seq_length": self.seq_length,
                "num_chunks": self.num_chunks, "num_tokens_read": self.tokens_read,
                "dropped_tail_tokens": None if self.stopped_early else int(len(self.carry)),  # the short tail
                **fingerprint, "sha256": self.digest.hexdigest(), **fields}
        _atomic_write_text(self.out / META_FILE, json.dumps(meta, indent=1) + "\n")
        return PackedCorpus(self.out)


def pack_corpus(sources: str | Sequence[str], tokenizer, out_dir: str | os.PathLike, seq_length: int = 512,
                text_field: str = "text", *, max_chunks: Optional[int] = None,
                key: Optional[str] = None) -> "PackedCorpus":
    """Tokenise the sources' documents, join them with EOS and write ``seq_length``-token chunks to ``out_dir``.

    Writes ``out_dir/tokens.bin`` ([num_chunks, seq_length] tokens, row-major) and ``out_dir/meta.json``
    (dtype, seq_length, num_chunks, tokenizer name / vocabulary size / vocabulary hash, sources, counts, the
    SHA-256 of the token file, and the cache ``key``). ``max_chunks`` stops early. Returns the opened corpus.
    """
    if seq_length < 2:
        raise DataError(f"seq_length must be at least 2 (input = chunk[:-1], labels = chunk[1:]), got {seq_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which joins the documents of a packed corpus")
    files = resolve_sources(sources)
    fp = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(fp["vocab_size"])
    out = Path(out_dir)
    num_docs = 0
    with _ChunkWriter(out, dtype, seq_length, max_chunks) as writer:
        for batch in _token_batches(iter_documents(files, text_field), tokenizer):
            pieces = []
            for ids in batch:
                pieces.append(np.asarray(ids, dtype=np.int64))
                pieces.append(np.asarray([eos], dtype=np.int64))
            num_docs += len(batch)
            if writer.add(pieces):
                break
        if writer.num_chunks == 0:
            raise DataError(f"the pre-training sources ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}) "
                            f"hold {writer.tokens_read} tokens, fewer than one chunk of {seq_length}")
        writer.commit()
    return writer.write_meta(fp, documents=DOCUMENT_FORMAT, num_documents=num_docs, sources=files,
                             text_field=text_field, key=key)


def import_megatron(source: str | os.PathLike, tokenizer, out_dir: str | os.PathLike, seq_length: int = 512, *,
                    max_chunks: Optional[int] = None) -> "PackedCorpus":
    """Copy the reference's processed Megatron corpus (:mod:`minillm.data.megatron`) into a packed corpus folder.

    Items are concatenated in order and cut into ``seq_length`` chunks (for the official files, whose items are
    the chunks, the same chunks); the tail shorter than a chunk is dropped and counted. Every id must lie in
    ``tokenizer``'s vocabulary (checked on all of them while copying); its fingerprint goes into ``meta.json``.
    """
    prefixes = megatron_prefixes(source)
    if not prefixes:
        raise DataError(f"`{source}` is not a Megatron corpus (no PREFIX.idx, PREFIX_0.idx or folder of *_0.idx)")
    if seq_length < 2:
        raise DataError(f"seq_length must be at least 2 (input = chunk[:-1], labels = chunk[1:]), got {seq_length}")
    indexes = [read_index(p) for p in prefixes]
    fp = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(fp["vocab_size"])
    out = Path(out_dir)
    items = 0
    with _ChunkWriter(out, dtype, seq_length, max_chunks) as writer:
        for item in item_stream(indexes):
            if len(item) and (int(item.max()) >= fp["vocab_size"] or int(item.min()) < 0):
                bad = int(item.max()) if int(item.max()) >= fp["vocab_size"] else int(item.min())
                raise DataError(f"Megatron corpus `{source}`, item {items}: token id {bad} is outside the "
                                f"tokenizer's {fp['vocab_size']} ids; use the corpus of this model family")
            items += 1
            if writer.add([item]):
                break
        if writer.num_chunks == 0:
            raise DataError(f"Megatron corpus `{source}` holds {writer.tokens_read} tokens, fewer than one chunk "
                            f"of {seq_length}")
        writer.commit()
    return writer.write_meta(fp, num_documents=None, num_items_read=items, sources=[str(p) for p in prefixes],
                             imported_from="megatron-mmidx", source_dtype=indexes[0].dtype.name, key=None)


# ----------------------------------------------------------------------------------------- reading
class PackedCorpus(Dataset):
    """A packed corpus folder, memory-mapped (no copy in RAM).

    Items are ``{input_ids: chunk[:-1], labels: chunk[1:], index: i}`` (torch.long, [seq_length − 1] each): every
    position is scored, as in the reference's LM loader. The memory map is opened lazily in each process,
    so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path.parent if path.name == META_FILE else path
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DataError(f"`{self.path}` is not a packed corpus (no {META_FILE}); pack it with "
                            "minillm.data.pack_corpus or `minillm-data`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: not a {FORMAT} metadata file")
        self.dtype = np.dtype(self.meta["dtype"])
        self.seq_length = int(self.meta["seq_length"])
        self.num_chunks = int(self.meta["num_chunks"])
        expected = self.num_chunks * self.seq_length * self.dtype.itemsize
        actual = (self.path / TOKENS_FILE).stat().st_size if (self.path / TOKENS_FILE).exists() else -1
        if actual != expected:
            raise DataError(f"{self.path / TOKENS_FILE}: {actual} bytes, but {META_FILE} describes {expected} "
                            f"({self.num_chunks} chunks x {self.seq_length} x {self.dtype.name}); re-pack the corpus")
        self._tokens: Optional[np.memmap] = None

    @property
    def tokens(self) -> np.memmap:
        """[num_chunks, seq_length] read-only memory map."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path / TOKENS_FILE, dtype=self.dtype, mode="r",
                                     shape=(self.num_chunks, self.seq_length))
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(np.asarray(self.tokens[i], dtype=np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "index": i}  # index: the chunk (teacher cache key)

    def check_tokenizer(self, tokenizer) -> None:
        """Fail when the corpus was packed with a different vocabulary than ``tokenizer``'s."""
        fp = tokenizer_fingerprint(tokenizer)
        if (self.meta.get("vocab_hash"), self.meta.get("vocab_size")) != (fp["vocab_hash"], fp["vocab_size"]):
            raise DataError(f"packed corpus `{self.path}` was tokenised with `{self.meta.get('tokenizer')}` "
                            f"(vocab {self.meta.get('vocab_size')}), not with `{fp['tokenizer']}` (vocab "
                            f"{fp['vocab_size']}); re-pack it with this tokenizer")


def _dist_info() -> tuple[bool, int]:
    """(distributed, is the packing rank of this node)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return True, int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())) == 0
    return False, True


def load_or_pack_corpus(cfg, tokenizer) -> "PackedCorpus | MegatronCorpus":
    """The pre-training corpus of a ``DataConfig``.

    ``cfg.pretrain`` names a folder that already holds a packed corpus (opened as it is, after checking its
    chunk length and vocabulary), the reference's processed Megatron ``.bin``/``.idx`` chunks (their prefix, read
    in place by :class:`~minillm.data.megatron.MegatronCorpus`), or text sources: then the corpus cached under
    ``cfg.cache_dir/corpus/<key>/`` is reused when its key (sources, vocabulary, seq_length) matches, and
    packed there otherwise. Under torch.distributed, local rank 0 packs and the other ranks wait.
    """
    if not cfg.pretrain:
        raise DataError("data.pretrain is not set: give a packed corpus folder or text/.jsonl files to pack")
    source = Path(cfg.pretrain).expanduser()
    if source.is_dir() and (source / META_FILE).is_file():
        corpus = PackedCorpus(source)
    elif is_megatron_source(cfg.pretrain):
        corpus = MegatronCorpus(cfg.pretrain)  # the reference's processed .bin/.idx chunks, read in place
    else:
        key = corpus_key(cfg.pretrain, tokenizer, cfg.pretrain_seq_length, cfg.pretrain_text_field)
        folder = Path(cfg.cache_dir) / "corpus" / key[:16]
        distributed, packer = _dist_info()

        def cached() -> Optional[PackedCorpus]:
            if (folder / META_FILE).is_file():
                corpus = PackedCorpus(folder)
                if corpus.meta.get("key") == key:
                    return corpus
            return None

        corpus = None
        if packer:
            corpus = cached() or pack_corpus(cfg.pretrain, tokenizer, folder, cfg.pretrain_seq_length,
                                             cfg.pretrain_text_field, key=key)
        if distributed:
            torch.distributed.barrier()  # the other ranks read the corpus only once it is complete
        corpus = corpus or cached()
        if corpus is None:
            raise DataError(f"packed corpus {folder} is missing after packing (is cache_dir shared by the ranks?)")
    if corpus.seq_length != cfg.pretrain_seq_length:
        raise DataError(f"packed corpus `{corpus.path}` has {corpus.seq_length}-token chunks, but "
                        f"data.pretrain_seq_length={cfg.pretrain_seq_length}")
    corpus.check_tokenizer(tokenizer)
    return corpus
