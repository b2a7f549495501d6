"""The demo's results: ``summary.json`` (numbers), ``report.md`` (table, verdict, samples) and PNG training curves.

All numbers come from ``minillm-eval``'s ``results.json`` and per-seed sample files and from the training runs'
``metrics.jsonl``; nothing is recomputed here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol


class Demo(Protocol):
    """What the report reads of a :class:`minillm.demo.pipeline.Demo` run (a protocol: the report never imports the
    pipeline, which imports the report)."""

    profile: Any
    paths: Any
    stages: Any
    device: str
    dtype: str
    teacher_dir: Path
    eval_models: Any

METRICS = ("rougeL", "teacher_logprob", "reverse_kl_k3", "dist4")
MODEL_LABELS = {"teacher": "Teacher", "sft": "SFT student", "minillm": "MiniLLM student"}

# Curves drawn from metrics.jsonl: (file stem, title, [(key, label)], y label)
MINILLM_PLOTS = [
    ("minillm_reward", "MiniLLM: rollout reward and teacher log-likelihood",
     [("rollout/reward", "mean reward r_t (scaled)"), ("rollout/teacher_logprob", "teacher log p per token"),
      ("dev/teacher_logprob", "dev: teacher log p of student samples")], "nats / token"),
    ("minillm_reverse_kl", "MiniLLM: reverse KL(student ‖ teacher) estimate (k3)",
     [("rollout/reverse_kl_k3", "rollouts"), ("dev/reverse_kl_k3", "dev samples")], "nats / token"),
    ("minillm_losses", "MiniLLM: losses",
     [("train/loss", "total"), ("train/pg_loss", "policy gradient (long-range)"),
      ("train/single_step_kl", "single-step KL"), ("train/pt_loss", "pre-training")], "loss"),
]
SFT_PLOTS = [
    ("sft_loss", "SFT warm start: loss on the teacher's responses",
     [("train/loss", "train"), ("dev/loss", "dev")], "cross-entropy (nats / token)"),
]


_PROMPT_TEXT = {"smollm2": "IFBench + the library's own", "tiny": "tests/assets/data"}
_LAYER_TEXT = {"outer": "the first and last ones", "even": "evenly spaced"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_metrics(eval_dir: Path, names: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """{model: {metric: mean over seeds}} from ``results.json`` and the name of its (single) data set."""
    results = json.loads((eval_dir / "results.json").read_text())["results"]
    out, set_name = {}, ""
    for name in names:
        if name not in results:
            raise KeyError(f"{eval_dir / 'results.json'} has no results for model `{name}` (has {list(results)})")
        sets = results[name]
        set_name = next(iter(sets))
        out[name] = {k: float(v) for k, v in sets[set_name]["mean"].items()}
    return out, set_name


def eval_samples(eval_dir: Path, name: str, set_name: str, seed: int) -> list[dict[str, Any]]:
    return json.loads((eval_dir / name / set_name / f"seed{seed}.json").read_text())["samples"]


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a folder's safetensors files (a tied head is stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def plot_curves(metrics: list[dict[str, Any]], specs: list, out_dir: Path) -> list[Path]:
    """One PNG per spec whose keys appear in ``metrics``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, title, series, ylabel in specs:
        lines = []
        for key, label in series:
            points = [(row["step"], row[key]) for row in metrics
                      if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
            if points:
                lines.append((label, points))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for label, points in lines:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=label)
        values = [y for _, points in lines for _, y in points]
        if min(values) > 0 and max(values) / min(values) > 50:
            # the k3 estimate on teacher-mixed rollouts has rare huge terms (p/q for tokens the teacher proposed)
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _cell(text: str, limit: int = 360) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return text.replace("|", "\\|") or "*(empty)*"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def verdict(models: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Is the MiniLLM student closer to the teacher than the SFT student (higher teacher log-likelihood)?"""
    sft, mini = models["sft"].get("teacher_logprob"), models["minillm"].get("teacher_logprob")
    if sft is None or mini is None:
        return {"minillm_closer_to_teacher": None, "teacher_logprob_gain": None, "text": "no teacher log-likelihood"}
    gain = mini - sft
    closer = gain > 0
    kl_sft, kl_mini = models["sft"].get("reverse_kl_k3"), models["minillm"].get("reverse_kl_k3")
    text = (f"The MiniLLM student's own samples get a {'higher' if closer else 'lower'} mean teacher "
            f"log-likelihood than the SFT student's ({mini:.3f} vs {sft:.3f} nats/token, "
            f"{gain:+.3f})")
    if kl_sft is not None and kl_mini is not None:
        text += f"; the reverse-KL estimate goes from {kl_sft:.3f} (SFT) to {kl_mini:.3f} (MiniLLM)"
    text += (". MiniLLM is " + ("closer to the teacher in the sense it optimises." if closer else
             "NOT closer to the teacher in this run: with this few steps and prompts the measurement is "
             "within run-to-run noise, or the training did not help."))
    return {"minillm_closer_to_teacher": closer, "teacher_logprob_gain": gain, "text": text}


def write_report(demo: "Demo", total_seconds: float) -> dict[str, Any]:
    p, paths = demo.profile, demo.paths
    model_dirs = demo.eval_models()
    names = list(model_dirs)
    models, set_name = eval_metrics(paths.eval, names)
    stage_times = {r.name: {"seconds": round(r.seconds, 2), "cached": r.cached} for r in demo.stages.results.values()}
    summary: dict[str, Any] = {
        "profile": p.name, "device": demo.device, "dtype": demo.dtype,
        "settings": p.settings(),
        "heldout_set": str(paths.teacher_heldout), "eval_seeds": list(p.eval_seeds),
        "models": {name: {"path": str(model_dirs[name]), "parameters": count_parameters(Path(model_dirs[name])),
                          **{m: models[name].get(m) for m in METRICS}} for name in names},
        "stages": stage_times,
        "total_seconds": round(total_seconds, 2),
        "verdict": verdict(models),
    }
    plots = plot_curves(read_jsonl(paths.minillm / "metrics.jsonl"), MINILLM_PLOTS, paths.out)
    plots += plot_curves(read_jsonl(paths.sft / "metrics.jsonl"), SFT_PLOTS, paths.out)
    summary["plots"] = [pl.name for pl in plots]
    (paths.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (paths.out / "report.md").write_text(_markdown(demo, summary, set_name))
    print(f"[demo] summary: {paths.out / 'summary.json'}, report: {paths.out / 'report.md'}")
    print(_table(summary))
    print(summary["verdict"]["text"])
    return summary


def _table(summary: dict[str, Any]) -> str:
    rows = ["| model | parameters | Rouge-L vs teacher ↑ | teacher log-lik / token ↑ | reverse KL (k3) ↓ | Dist-4 ↑ |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, m in summary["models"].items():
        rows.append(f"| {MODEL_LABELS.get(name, name)} | {_fmt_count(m['parameters'])} | {_fmt(m['rougeL'])} | "
                    f"{_fmt(m['teacher_logprob'], 3)} | {_fmt(m['reverse_kl_k3'], 3)} | {_fmt(m['dist4'])} |")
    return "\n".join(rows) + "\n"


def _markdown(demo: "Demo", summary: dict[str, Any], set_name: str) -> str:
    p, paths = demo.profile, demo.paths
    heldout = read_jsonl(paths.heldout_prompts)
    references = read_jsonl(paths.teacher_heldout)
    seed = p.eval_seeds[0]
    samples = {name: eval_samples(paths.eval, name, set_name, seed) for name in summary["models"]}
    by_prompt = {name: {s["prompt"]: s["output"] for s in rows} for name, rows in samples.items()}
    lines = [
        f"# MiniLLM demo ({p.name} profile)", "",
        f"Teacher: `{demo.teacher_dir}`. Student: the teacher with {p.keep_layers} of its decoder layers kept "
        f"({_LAYER_TEXT.get(p.layer_choice, p.layer_choice)}; `{paths.student_init}`), warm-started by SFT on "
        f"the teacher's answers to {p.num_train} prompts "
        f"(`{paths.sft}/final`), then trained with MiniLLM (reverse KL by policy gradient, teacher-mixed "
        f"sampling α = 0.2, no pre-training loss) from that SFT checkpoint (`{paths.minillm}/final`).", "",
        f"Evaluation: {len(references)} held-out prompts ({_PROMPT_TEXT.get(p.prompts, p.prompts)}), one sample "
        "per model and "
        f"seed (seeds {', '.join(map(str, p.eval_seeds))}; T = 1, up to {p.max_new_tokens} new tokens). "
        "Rouge-L is against the teacher's own held-out answers (sampled with another seed, so the teacher row "
        "is the teacher-vs-itself ceiling). *Teacher log-lik / token* is the teacher's mean log-probability of "
        "each model's **own** samples (EOS included): reverse KL = E_q[log q − log p], so this is the part of "
        "the objective MiniLLM pushes up. Device: "
        f"{summary['device']} ({summary['dtype']}).", "",
        _table(summary), "",
        f"**Verdict.** {summary['verdict']['text']}", "",
        "## Stage times", "", "| stage | seconds | |", "|---|---:|---|",
    ]
    for name, st in summary["stages"].items():
        lines.append(f"| {name} | {st['seconds']:.1f} | {'cached from an earlier run' if st['cached'] else ''} |")
    ran = sum(st["seconds"] for st in summary["stages"].values())
    lines += [f"| **sum of the stages (when they ran)** | {ran:.1f} | |",
              f"| **this invocation (cached stages skipped)** | {summary['total_seconds']:.1f} | |", ""]
    lines += ["## Sample answers (held-out prompts)", ""]
    for i, (meta, ref) in enumerate(zip(heldout[:4], references[:4])):
        instruction = meta["instruction"] + (f"\n\n{meta['input']}" if meta.get("input") else "")
        lines += [f"**{i + 1}. {_cell(instruction, 400)}** (`{meta['id']}`)", "",
                  "| teacher (reference) | SFT student | MiniLLM student |", "|---|---|---|",
                  f"| {_cell(ref['output'])} | {_cell(by_prompt['sft'].get(ref['prompt'], ''))} | "
                  f"{_cell(by_prompt['minillm'].get(ref['prompt'], ''))} |", ""]
    lines += ["## Training curves", "",
              "Rollout metrics are averaged over each rollout phase (constant within a phase). The rollout k3 "
              "estimate is taken on teacher-mixed samples: a token the teacher proposed that the student finds "
              "unlikely adds a huge p/q term, so it sits far above the dev estimate, which uses the student's own "
              "samples.", ""]
    for name in summary["plots"]:
        lines += [f"![{name}]({name})", ""]
    lines += ["Files: `summary.json` (every number above), `eval/` (minillm-eval output with all samples), "
              "`sft/`, `minillm/` (training runs: `metrics.jsonl`, `final/`), `data/` (prompts and teacher "
              "answers), `logs/`.", ""]
    return "\n".join(lines)
