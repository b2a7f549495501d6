"""Instruction records: reading local JSON/JSONL files, named sets and hub datasets into one shape.

Every accepted record shape is normalised into a :class:`Record`:

- ``{prompt, output}``: a pre-formatted prompt; ``output`` may be one string or a list of references
  (the MiniLLM evaluation sets and ``minillm-generate`` output);
- ``{instruction, input, output}``: Alpaca style, ``input`` optional or empty;
- ``{instruction, context, response}``: raw Dolly-15k.

Records that carry both ``prompt`` and ``instruction`` (the MiniLLM sets do) keep both, so that the
template mode decides which one is used (see :mod:`minillm.data.templates`).

Errors name the file, the line and the field, because a data problem found after a model has been
loaded costs minutes; :func:`load_records` reads and validates everything before returning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..config_checks import train_sources
from ..errors import UserError


class DataError(UserError, ValueError):
    """Bad or missing data, with the file, line and field in the message."""


@dataclass
class Record:
    """One instruction example, whatever shape it was stored in.

    ``prompt`` is set only when the source held a pre-formatted prompt. ``references`` holds every
    reference response (training uses the first, evaluation all of them); it is empty only for
    prompt-only records read with ``require_response=False``.
    """

    instruction: Optional[str] = None
    input: str = ""
    prompt: Optional[str] = None
    references: list[str] = field(default_factory=list)
    source: str = ""
    line: int = 0
    # the record's other scalar fields (e.g. `source`, read by multi-teacher routing: minillm.routing)
    fields: dict = field(default_factory=dict)
    # the data.train entry (file, named set or hub id, as spelled there) the record was read from; routing by
    # file or by dataset reads it, since `source` is the resolved file and a named set has no name in it
    origin: str = ""

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        if not self.references:
            raise DataError(f"{self.where}: the record has no reference response")
        return self.references[0]

    @property
    def where(self) -> str:
        """``file:line`` for messages."""
        return f"{self.source}:{self.line}"


# ----------------------------------------------------------------------------------------- named sets
@dataclass(frozen=True)
class NamedSet:
    """A known dataset: its hub id and, per split, the file inside the hub repository."""

    hub_id: str
    files: dict[str, str]
    default_split: str


# The MiniLLM evaluation sets are plain JSONL files in hub dataset repos (LMOps minillm/README: download
# them into data/<name>/). Dolly's raw.jsonl is the training pool (its first 1000 records are the dev
# set), valid.jsonl the 500 test prompts. S-NI and UnNI are used through their length bucket `11_`.
NAMED_SETS: dict[str, NamedSet] = {
    "dolly": NamedSet("MiniLLM/dolly", {"train": "raw.jsonl", "test": "valid.jsonl"}, "train"),
    "self_inst": NamedSet("MiniLLM/self-inst", {"test": "valid.jsonl"}, "test"),
    "vicuna": NamedSet("MiniLLM/Vicuna", {"test": "valid.jsonl"}, "test"),
    "sinst": NamedSet("MiniLLM/sinst", {"test": "11_/valid.jsonl"}, "test"),
    "uinst": NamedSet("MiniLLM/uinst", {"test": "11_/valid.jsonl"}, "test"),
    "dolly-15k": NamedSet("databricks/databricks-dolly-15k", {"train": "databricks-dolly-15k.jsonl"}, "train"),
}

# Split names that mean "held-out data"; a set that has only one of them serves all of them.
_EVAL_SPLITS = ("test", "valid", "validation", "dev")


def _named_file(name: str, split: Optional[str]) -> tuple[NamedSet, str]:
    spec = NAMED_SETS[name]
    split = split or spec.default_split
    if split in spec.files:
        return spec, spec.files[split]
    if split in _EVAL_SPLITS:
        for alias in _EVAL_SPLITS:
            if alias in spec.files:
                return spec, spec.files[alias]
    raise DataError(f"named set `{name}` has no split `{split}` (it has: {', '.join(spec.files)})")


# ----------------------------------------------------------------------------------------- parsing
def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field `{name}` must be a string, got {type(value).__name__}")
    return value


def _references(value: Any, where: str, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{where}: field `{name}` must be a string or a non-empty list of strings, "
                    f"got {json.dumps(value)[:80]}")


def parse_record(obj: Any, source: str, line: int, *, response_field: str = "output",
                 require_response: bool = True) -> Record:
    """Normalise one JSON object into a :class:`Record`, or raise :class:`DataError` naming what is missing.

    ``response_field`` names the reference field of ``{prompt, ...}`` and Alpaca records (``output`` by default);
    raw Dolly records use ``response``.
    """
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rec = Record(source=source, line=line, fields={k: v for k, v in obj.items() if isinstance(v, (str, int, float))
                                                   and k not in ("prompt", "instruction", "input", "context")})
    if "prompt" in obj:
        rec.prompt = _text(obj["prompt"], where, "prompt")
    if "instruction" in obj:
        rec.instruction = _text(obj["instruction"], where, "instruction")
        # Alpaca's `input` and raw Dolly's `context` are the same thing: optional extra context.
        for key in ("input", "context"):
            if obj.get(key) is not None:
                rec.input = _text(obj[key], where, key)
                break
    if rec.prompt is None and rec.instruction is None:
        raise DataError(f"{where}: missing field `prompt` or `instruction` (accepted shapes: {{prompt, output}}, "
                        f"{{instruction, input, output}}, {{instruction, context, response}}); "
                        f"the record has: {', '.join(sorted(obj)) or 'no fields'}")
    candidates = [response_field] + [k for k in ("output", "response") if k != response_field]
    key = next((k for k in candidates if k in obj and obj[k] is not None), None)
    if key is not None:
        rec.references = _references(obj[key], where, key)
    elif require_response:
        raise DataError(f"{where}: missing field `{response_field}` (the reference response; raw Dolly records "
                        f"may use `response`)")
    return rec


def _iter_jsonl(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None


def _iter_json_array(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each one starts on (for error messages)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    first = True
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        if not first:
            if pos >= len(text) or text[pos] != ",":
                line = text.count("\n", 0, pos) + 1
                raise DataError(f"{path}:{line}: malformed JSON (expected ',' or ']' between array elements)")
            pos += 1
            while pos < len(text) and text[pos].isspace():
                pos += 1
        first = False
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield line, obj


def read_json_objects(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line, object) pairs of a ``.jsonl`` file or a ``.json`` file holding a list (or, leniently, JSON lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        return list(_iter_json_array(path, text))
    if path.suffix == ".json" and stripped.startswith("{"):
        # A single object spanning the file, or JSON lines under a .json name (common in the wild).
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            return list(_iter_jsonl(path, text))
        raise DataError(f"{path}: a .json data file must hold a list of records, found one object with keys "
                        f"{sorted(whole)[:8]}")
    return list(_iter_jsonl(path, text))


def _read_file(path: Path, response_field: str, require_response: bool) -> list[Record]:
    records = [parse_record(obj, str(path), line, response_field=response_field, require_response=require_response)
               for line, obj in read_json_objects(path)]
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


# ----------------------------------------------------------------------------------------- sources
def _pick_in_folder(folder: Path, split: Optional[str]) -> Path:
    """The data file for ``split`` inside a folder holding a set's files (e.g. a downloaded MiniLLM set)."""
    split = split or "train"
    if split == "train":
        names = ["raw.jsonl", "train.jsonl", "train.json"]
    else:
        names = ["valid.jsonl", "validation.jsonl", "dev.jsonl", "test.jsonl", "valid.json", "test.json",
                 "11_/valid.jsonl"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
    if len(files) == 1:
        return files[0]
    listing = ", ".join(str(p.relative_to(folder)) for p in files[:10]) or "no .json/.jsonl files"
    raise DataError(f"{folder}: cannot tell which file holds split `{split}` (looked for {', '.join(names)}; "
                    f"found {listing}); pass the file itself")


def hub_unreachable_error(hub_id: str, err: Exception, hint_file: str = "FILE.jsonl") -> DataError:
    """The error for a hub dataset that could not be fetched, saying how to pass a local copy instead."""
    return DataError(
        f"cannot get the dataset `{hub_id}` from the Hugging Face hub ({type(err).__name__}: {str(err)[:200]}). "
        f"The hub is unreachable, offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) or the id is wrong. "
        f"Download it "
        f"where there is network (`huggingface-cli download {hub_id} --repo-type dataset --local-dir DIR`) and "
        f"pass the local file or folder instead, e.g. data.train=DIR/{hint_file}")


def _download_named(name: str, split: Optional[str], cache_dir: Optional[str]) -> Path:
    spec, filename = _named_file(name, split)
    if cache_dir is not None:
        # Files that `minillm-data` (or the user) placed in the cache are used without the hub.
        local = Path(cache_dir) / "sets" / name / filename
        if local.is_file():
            return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.hub_id, filename, repo_type="dataset",
                                    cache_dir=str(Path(cache_dir) / "hub") if cache_dir else None))
    except Exception as e:  # offline, no network, missing file: all need the same advice
        raise hub_unreachable_error(spec.hub_id, e, filename) from e


def _load_hub_dataset(hub_id: str, split: Optional[str], cache_dir: Optional[str], response_field: str,
                      require_response: bool) -> list[Record]:
    try:
        import datasets

        loaded = datasets.load_dataset(hub_id, cache_dir=str(Path(cache_dir) / "datasets") if cache_dir else None)
    except Exception as e:
        raise hub_unreachable_error(hub_id, e) from e
    wanted = split or "train"
    options = [wanted] + (list(_EVAL_SPLITS) if wanted in _EVAL_SPLITS else [])
    name = next((s for s in options if s in loaded), None)
    if name is None:
        raise DataError(f"hub dataset `{hub_id}` has no split `{wanted}` (it has: {', '.join(loaded)})")
    source = f"{hub_id}[{name}]"
    records = [parse_record(dict(row), source, i + 1, response_field=response_field,
                            require_response=require_response) for i, row in enumerate(loaded[name])]
    if not records:
        raise DataError(f"{source}: the dataset split holds no records")
    return records


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.endswith((".json", ".jsonl")) and not source.startswith(".")


def load_train_records(spec: str | Sequence[str], **kw: Any) -> list[Record]:
    """Every record of every source of ``spec`` (data.train: one source or a list), concatenated in order, each with
    its ``origin`` set to the source it came from. ``kw``: as :func:`load_records`."""
    out: list[Record] = []
    for source in train_sources(spec):
        records = load_records(source, **kw)
        for record in records:
            record.origin = source
        out.extend(records)
    return out


def load_records(source: str, *, cache_dir: Optional[str] = None, split: Optional[str] = None,
                 response_field: str = "output", require_response: bool = True) -> list[Record]:
    """Read and validate every record of ``source``.

    ``source`` is a local ``.json``/``.jsonl`` file, a local folder holding a set's files, a named set
    (``dolly``, ``dolly-15k``, ``self_inst``, ``vicuna``, ``sinst``, ``uinst``) or an HF dataset id
    (``owner/name``). ``split`` picks the file of a named set or folder (``train``: Dolly's raw.jsonl;
    ``test``/``valid``/``dev``: the evaluation file; default: the set's own default) or the split of a hub
    dataset (default ``train``). Named sets are looked up under ``cache_dir/sets/<name>/`` before the hub.

    Raises :class:`DataError` for a missing file, malformed JSON (file and line), a record without its
    fields (file, line and field), an empty set, or an unreachable hub (with how to pass a local file).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, response_field, require_response)
    if path.is_dir():
        return _read_file(_pick_in_folder(path, split), response_field, require_response)
    if source in NAMED_SETS:
        return _read_file(_download_named(source, split, cache_dir), response_field, require_response)
    if source.endswith((".json", ".jsonl")) or ("/" in source and not looks_like_hub_id(source)):
        raise DataError(f"data file or folder `{source}` does not exist")
    if looks_like_hub_id(source):
        return _load_hub_dataset(source, split, cache_dir, response_field, require_response)
    raise DataError(f"unknown data source `{source}`: not a file or folder, not a named set "
                    f"({', '.join(NAMED_SETS)}) and not a hub id (owner/name)")
