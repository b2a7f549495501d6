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
_LAYER_TEXT = {"outer": "the first and last ones", "even": "evenly spaced",
               "influence": "those of highest block influence on the teacher's own answers"}


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
        return {"minillm_closer_to_teacher": None, "teacher_logprob_gain": None}
    return {"minillm_closer_to_teacher": mini > sft, "teacher_logprob_gain": mini - sft}


def greedy_summary(greedy_file: Path, heldout: list[dict[str, Any]]) -> dict[str, Any]:
    """The greedy answers with their judgement (:func:`minillm.demo.verdict.judge_greedy`) and the prompt order,
    best-answered by the MiniLLM student first."""
    from .verdict import best_first, judge_greedy

    data = json.loads(greedy_file.read_text(encoding="utf-8"))
    if len(data["prompts"]) != len(heldout):
        raise ValueError(f"{greedy_file}: {len(data['prompts'])} prompts, but {len(heldout)} held-out ones")
    judged = judge_greedy(data["answers"])
    return {"prompts": data["prompts"], "answers": data["answers"], **judged, "order": best_first(judged)}


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
    heldout = read_jsonl(paths.heldout_prompts)
    greedy = greedy_summary(paths.greedy, heldout)
    summary["greedy"] = {k: greedy[k] for k in ("counts", "repeat_limit", "overlap_min", "order")}
    from .verdict import verdict_text

    best = heldout[greedy["order"][0]]["instruction"] if greedy["counts"]["minillm"]["readable"] else None
    teacher_layers = json.loads((Path(model_dirs["teacher"]) / "config.json").read_text())["num_hidden_layers"]
    summary["verdict"]["text"] = verdict_text(summary["models"], greedy, best, p.keep_layers, teacher_layers,
                                              p.greedy_repetition_penalty)
    plots = plot_curves(read_jsonl(paths.minillm / "metrics.jsonl"), MINILLM_PLOTS, paths.out)
    plots += plot_curves(read_jsonl(paths.sft / "metrics.jsonl"), SFT_PLOTS, paths.out)
    summary["plots"] = [pl.name for pl in plots]
    (paths.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (paths.out / "report.md").write_text(_markdown(demo, summary, set_name, greedy))
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


def _markdown(demo: "Demo", summary: dict[str, Any], set_name: str, greedy: dict[str, Any]) -> str:
    p, paths = demo.profile, demo.paths
    heldout = read_jsonl(paths.heldout_prompts)
    references = read_jsonl(paths.teacher_heldout)
    seed = p.eval_seeds[0]
    if [r["prompt"] for r in references] != greedy["prompts"]:
        raise ValueError(f"{paths.greedy} answers other prompts than {paths.teacher_heldout}: rerun with --force")
    samples = {name: eval_samples(paths.eval, name, set_name, seed) for name in summary["models"]}
    by_prompt = {name: {s["prompt"]: s["output"] for s in rows} for name, rows in samples.items()}
    lines = [
        f"# MiniLLM demo ({p.name} profile)", "",
        f"Teacher: `{demo.teacher_dir}`. Student: the teacher with {p.keep_layers} of its decoder layers kept "
        f"({_LAYER_TEXT.get(p.layer_choice, p.layer_choice)}; `{paths.student_init}`), warm-started by SFT on "
        f"the teacher's answers to {p.num_train} prompts"
        f"{'' if p.sft_temperature == 1.0 else f' (sampled at T = {p.sft_temperature:g})'} "
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
    lines += _answers_markdown(heldout, by_prompt, greedy, p.greedy_repetition_penalty)
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


def _answers_markdown(heldout: list[dict[str, Any]], sampled: dict[str, dict[str, str]],
                      greedy: dict[str, Any], repetition_penalty: float) -> list[str]:
    """The held-out prompts best-answered first: an overview table, then each prompt's greedy answers next to
    the T = 1 samples of the same models."""
    judged, answers, prompts = greedy["per_prompt"], greedy["answers"], greedy["prompts"]
    lines = ["## Held-out prompts, best-answered first", "",
             "Sorted by how well the MiniLLM student's **greedy** answer does: readable ones first (at most "
             f"{greedy['repeat_limit']:.0%} repeated word trigrams and Rouge-L ≥ {greedy['overlap_min']:.0f} "
             "against the teacher's greedy answer), then by that Rouge-L. Greedy answers are shown for reading"
             + ("" if repetition_penalty == 1.0 else
                f" (every model's, with CTRL's repetition penalty {repetition_penalty:g} on the logits of tokens "
                "already in the prompt or answer: plain greedy decoding of models this small loops)")
             + "; the scores above use the T = 1 samples (the paper's protocol), shown beside them.", "",
             "| rank | prompt | MiniLLM greedy: Rouge-L vs teacher | readable | SFT greedy: Rouge-L vs teacher "
             "| readable |", "|---:|---|---:|:-:|---:|:-:|"]
    for rank, i in enumerate(greedy["order"], start=1):
        m, s = judged["minillm"][i], judged["sft"][i]
        lines.append(f"| {rank} | {_cell(heldout[i]['instruction'], 80)} (`{heldout[i]['id']}`) | "
                     f"{m['rougeL_vs_teacher']:.1f} | {'yes' if m['readable'] else 'no'} | "
                     f"{s['rougeL_vs_teacher']:.1f} | {'yes' if s['readable'] else 'no'} |")
    lines.append("")
    for rank, i in enumerate(greedy["order"], start=1):
        meta = heldout[i]
        instruction = meta["instruction"] + (f"\n\n{meta['input']}" if meta.get("input") else "")
        lines += [f"**{rank}. {_cell(instruction, 400)}** (`{meta['id']}`)", "",
                  "| model | greedy answer | T = 1 sample (scored) |", "|---|---|---|"]
        for name, label in MODEL_LABELS.items():
            lines.append(f"| {label} | {_cell(answers[name][i])} | {_cell(sampled[name].get(prompts[i], ''))} |")
        lines.append("")
    return lines
