"""Train and evaluate several distillation methods on the same data, seeds and evaluation; one table.

A *method* names a shipped recipe folder, optionally with a word-level divergence suffix:

=====================  ==============================================================================
``sft``, ``kd``,        configs/<method>/<pair>.yaml (``--pair tiny``: configs/tiny/<method>.yaml)
``seqkd``, ``minillm``,
``gkd``, ``distillm``,
``minillm-single-step``,
``minillm-ranking``,
``opd``
``<word-level>-<div>``  the same recipe with ``kd.divergence=<div>``, for kd, seqkd, gkd, distillm and every
                        divergence of DESIGN §4 (``kd-rkl``, ``gkd-tvd``, ``distillm-sfkl``, ...)
=====================  ==============================================================================

Every run gets the same ``seed`` and the same ``--train-override`` values (e.g. ``train.max_steps=100``), writes to
``OUT/runs/<method>``, and its ``best/`` (or ``final/``) model is then evaluated together with the others by one
:func:`minillm.evaluation.protocol.run_eval` call (the ``minillm-eval`` protocol: same sets, prompts, sampling seeds).
Outputs: ``OUT/eval/`` (minillm-eval's files), ``OUT/compare.json`` (per method: config, overrides, training
summary, evaluation means/stds) and ``OUT/compare.md`` (the table, also printed).

Note that the paper recipes chain: MiniLLM students and every teacher are SFT outputs (configs/sft). Run those
first; this module compares methods, it does not build their prerequisites.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import shipped_config_dir
from .errors import UserError

BASE_METHODS = ("sft", "kd", "seqkd", "minillm", "gkd", "distillm", "minillm-single-step", "minillm-ranking",
                "opd")
WORD_LEVEL = ("kd", "seqkd", "gkd", "distillm")
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "sfkl", "srkl")  # = minillm.losses.DIVERGENCES (no torch import here)


class CompareError(UserError, ValueError):
    """A bad method name, a missing recipe or a failed run, with what to do about it."""


@dataclass
class MethodSpec:
    """One row of the comparison: the recipe and the overrides that make the method."""

    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)


def resolve_method(name: str, pair: str, config_dir: Path | None = None) -> MethodSpec:
    """``kd-rkl`` + ``gpt2-base`` → configs/kd/gpt2-base.yaml with ``kd.divergence=rkl``."""
    root = config_dir or shipped_config_dir()
    base, overrides = name, []
    if name not in BASE_METHODS:
        head, _, div = name.rpartition("-")
        if head in WORD_LEVEL and div in DIVERGENCES:
            base, overrides = head, [f"kd.divergence={div}"]
        else:
            raise CompareError(f"unknown method `{name}`: choose from {', '.join(BASE_METHODS)}, or "
                               f"<{'|'.join(WORD_LEVEL)}>-<{'|'.join(DIVERGENCES)}>")
    path = root / "tiny" / f"{base}.yaml" if pair == "tiny" else root / base / f"{pair}.yaml"
    if not path.is_file():
        raise CompareError(f"method `{name}` on `{pair}`: no recipe {path}; pick a pair that ships under "
                           f"{root / base} (or `tiny`)")
    return MethodSpec(name, path, overrides)


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """Training summary from metrics.jsonl: last step, last train loss, best dev Rouge-L / lowest dev loss."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    train = [r for r in rows if "train/loss" in r]
    rouge = [r["dev/rougeL"] for r in rows if "dev/rougeL" in r]
    dev_loss = [r["dev/loss"] for r in rows if "dev/loss" in r]
    return {"steps": max((r["step"] for r in rows), default=0),
            "train_loss": train[-1]["train/loss"] if train else None,
            "best_dev_rougeL": max(rouge) if rouge else None,
            "best_dev_loss": min(dev_loss) if dev_loss else None}


def train_method(spec: MethodSpec, run_dir: Path, seed: int, overrides: Sequence[str], launcher: str = "",
                 log=print) -> float:
    """Train one method into ``run_dir``; returns wall seconds. In-process unless ``launcher`` is given
    (e.g. ``"deepspeed --num_gpus 8"``, then ``-m minillm.cli.train`` runs under it)."""
    args = ["--config", str(spec.config), *spec.overrides, f"output_dir={run_dir}", f"seed={seed}", *overrides]
    log(f"[compare] training {spec.name}: minillm-train {' '.join(shlex.quote(a) for a in args)}")
    start = time.perf_counter()
    if launcher:
        command = [*shlex.split(launcher), "-m", "minillm.cli.train", *args]
        done = subprocess.run(command, check=False)
        code = done.returncode
    else:
        from .cli.train import main as train_main

        code = train_main(args)
    if code != 0:
        raise CompareError(f"training `{spec.name}` failed (exit {code}); see {run_dir}/train.log")
    return time.perf_counter() - start


def pick_model(run_dir: Path, pick: str) -> Path:
    """``best/`` when asked and present (a run without dev evaluation has none), else ``final/``."""
    if pick == "best" and (run_dir / "best").is_dir():
        return run_dir / "best"
    if (run_dir / "final").is_dir():
        return run_dir / "final"
    raise CompareError(f"{run_dir}: no final/ model; did the training finish?")


def format_comparison(rows: list[dict[str, Any]], sets: Sequence[str], metric: str = "rougeL") -> str:
    """Markdown: one row per method with its training summary and ``metric`` (mean ± std over seeds) per set."""
    def num(x, digits=3):
        return "–" if x is None else f"{x:.{digits}f}"

    head = ["method", "model", "steps", "train s", "last train loss", "best dev Rouge-L"] + [f"{s} {metric}"
                                                                                            for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["model_dir"], str(r["train"]["steps"]), num(r["train_seconds"], 1),
                 num(r["train"]["train_loss"]), num(r["train"]["best_dev_rougeL"], 2)]
        for s in sets:
            e = r["eval"].get(s, {})
            cells.append(f"{e['mean'][metric]:.2f} ± {e['std'][metric]:.2f}" if metric in e.get("mean", {}) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_comparison(methods: Sequence[str], pair: str, out: str | Path, data: Sequence[str], *, seed: int = 10,
                   eval_seeds: Sequence[int] = (10,), train_overrides: Sequence[str] = (), pick: str = "best",
                   num: int = -1, max_new_tokens: int = 256, batch_size: int = 16, device: str = "auto",
                   launcher: str = "", skip_trained: bool = False, progress: bool = True,
                   log=print) -> dict[str, Any]:
    """Train every method, evaluate them side by side, write compare.json / compare.md; returns the JSON."""
    from .evaluation.protocol import run_eval
    from .evaluation.runner import set_names, write_json
    from .evaluation.settings import EvalSettings

    if not methods:
        raise CompareError("no method given")
    if len(set(methods)) != len(methods):
        raise CompareError(f"a method is listed twice: {list(methods)}")
    specs = [resolve_method(m, pair) for m in methods]  # every name checked before any training starts
    out = Path(out)
    rows = []
    for spec in specs:
        run_dir = out / "runs" / spec.name
        seconds = None
        if not (skip_trained and (run_dir / "final").is_dir()):
            seconds = train_method(spec, run_dir, seed, train_overrides, launcher, log)
        rows.append({"method": spec.name, "config": str(spec.config), "overrides": [*spec.overrides, *train_overrides],
                     "seed": seed, "run_dir": str(run_dir), "model_dir": str(pick_model(run_dir, pick).name),
                     "model": str(pick_model(run_dir, pick)), "train_seconds": seconds,
                     "train": last_metrics(run_dir)})
    settings = EvalSettings(model=[r["model"] for r in rows], name=[r["method"] for r in rows], data=list(data),
                            out=str(out / "eval"), seeds=list(eval_seeds), num=num, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, device=device, progress=progress).check()
    outcome = run_eval(settings, log=log)
    sets = set_names(settings.data)
    evaluated = outcome.results.get("results", {})  # results.json's body: {"settings", "results"}
    for r in rows:
        r["eval"] = evaluated.get(r["method"], {})
    table = format_comparison(rows, sets)
    result = {"pair": pair, "seed": seed, "eval_seeds": list(eval_seeds), "data": list(data), "sets": sets,
              "pick": pick, "methods": rows, "table": table}
    write_json(out / "compare.json", result)
    (out / "compare.md").write_text(table)
    log(table)
    return result
