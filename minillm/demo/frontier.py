"""Cheap proxies for choosing the demo's student: initialisation × SFT warm start, measured in-process.

    python -m minillm.demo.frontier --run runs/demo-quick --out benchmarks/results/demo-frontier.json

Reads a finished demo run's teacher data (``<run>/data``: the teacher's answers to the training, dev and held-out
prompts) and, for each variant (which layers are kept, how many, tied or untied head, SFT steps and learning
rate, SFT data), builds the student, trains it by plain SFT on the teacher's training answers and measures

- ``init_ce`` / ``sft_ce``: cross-entropy (nats/token) of the held-out teacher answers before / after SFT;
- ``teacher_logprob`` and ``reverse_kl_k3``: the teacher's mean log-probability of the student's own T = 1
  samples of the held-out prompts (EOS included) and the k3 estimate of KL(student ‖ teacher) per token, as
  minillm-eval computes them, but pooled over tokens and from one seed;
- ``readable``: how many greedy answers meet :mod:`minillm.demo.verdict`'s criterion;
- ``seconds``: wall time of the SFT steps and of the whole variant (machine load is recorded beside them).

No MiniLLM stage runs here (its cost is that of the full pipeline): these proxies rank initialisations and warm
starts, which MiniLLM then starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .greedy import prompt_batches


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pairs(tokenizer, rows: list[dict[str, Any]], max_prompt_length: int) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    return [(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][:max_prompt_length],
             tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [eos]) for r in rows]


def _batch(pairs, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the responses)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(pairs), width), dtype=torch.long, device="cpu")
    labels = torch.full((len(pairs), width), -100, dtype=torch.long, device="cpu")
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, device="cpu")
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r, device="cpu")
    return ids, mask, labels


def _token_logprobs(model, ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens [B, T-1] and their mask."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * valid, valid


@torch.no_grad()
def cross_entropy(model, pairs, pad: int, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        lp, valid = _token_logprobs(model, *_batch(pairs[start:start + batch_size], pad))
        total -= float(lp.sum())
        count += int(valid.sum())
    return total / count


def sft(model, pairs, pad: int, *, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Plain SFT: AdamW (weight decay 0.01), linear warm-up over one step then constant, cycling the data."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    model.train()
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=gen, device="cpu").tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        lp, valid = _token_logprobs(model, *_batch([pairs[i] for i in chosen], pad))
        loss = -lp.sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def sample_scores(student, teacher, tokenizer, prompts: list[str], *, max_new_tokens: int, max_prompt_length: int,
                  seed: int) -> dict[str, float]:
    """Teacher log-lik per token and k3 per token of the student's T = 1 samples (EOS included)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    pairs = []
    for b in prompt_batches(tokenizer, prompts, max_prompt_length, 16, "cpu"):
        out = student.generate(**b, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        for row, mask, resp in zip(b["input_ids"], b["attention_mask"], out[:, b["input_ids"].shape[1]:].tolist()):
            prompt = row[mask.bool()].tolist()
            cut = resp.index(eos) + 1 if eos in resp else len(resp)
            pairs.append((prompt, resp[:cut]))
    ids, mask, labels = _batch(pairs, pad)
    lp_t, valid = _token_logprobs(teacher, ids, mask, labels)
    lp_s, _ = _token_logprobs(student, ids, mask, labels)
    log_ratio = (lp_t - lp_s)[valid]
    k3 = (log_ratio.exp() - 1) - log_ratio
    return {"teacher_logprob": float(lp_t[valid].mean()), "reverse_kl_k3": float(k3.mean()),
            "tokens": int(valid.sum())}


def build_student(teacher_dir: Path, work: Path, keep: int, choice: str, tied: bool,
                  calibration: list[list[int]] | None = None):
    from transformers import AutoModelForCausalLM

    from .models import prune_layers

    folder = work / f"{choice}-{keep}"
    if not (folder / "config.json").exists():
        prune_layers(teacher_dir, folder, keep, choice, calibration)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if not tied and model.config.tie_word_embeddings:
        # its own copy of the output layer: +vocab × hidden parameters, trained apart from the input embeddings
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    return model.eval()


def run_variant(v: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    from .verdict import judge_greedy

    start = time.perf_counter()
    tok, teacher = ctx["tokenizer"], ctx["teacher"]
    train_pairs = ctx["train_pairs_" + v.get("data", "t1")]
    from .pipeline import CALIBRATION_ANSWERS  # the demo's own calibration: its first training answers

    student = build_student(ctx["teacher_dir"], ctx["work"], v["keep"], v["choice"], v.get("tied", True),
                            [p + r for p, r in ctx["train_pairs_t1"][:CALIBRATION_ANSWERS]])
    params = sum(p.numel() for p in student.parameters())  # shared (tied) tensors are counted once
    init_ce = cross_entropy(student, ctx["heldout_pairs"], tok.pad_token_id)
    if v.get("init_only"):  # the initialisation alone: no training, no sampling
        return {**v, "parameters": params, "init_ce": init_ce, "seconds": time.perf_counter() - start}
    sft_start = time.perf_counter()
    sft(student, train_pairs, tok.pad_token_id, steps=v["steps"], lr=v["lr"], batch_size=8, seed=10)
    sft_seconds = time.perf_counter() - sft_start
    result = {**v, "parameters": params, "init_ce": init_ce,
              "sft_ce": cross_entropy(student, ctx["heldout_pairs"], tok.pad_token_id), "sft_seconds": sft_seconds,
              **sample_scores(student, teacher, tok, ctx["prompts"], max_new_tokens=ctx["max_new_tokens"],
                              max_prompt_length=ctx["max_prompt_length"], seed=20)}
    batches = prompt_batches(tok, ctx["prompts"], ctx["max_prompt_length"], 16, "cpu")
    with torch.no_grad():
        texts = []
        for b in batches:
            out = student.generate(**b, do_sample=False, max_new_tokens=ctx["max_new_tokens"],
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts += [t.strip() for t in tok.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True)]
    judged = judge_greedy({"teacher": ctx["teacher_greedy"], "minillm": texts})
    result["readable"] = judged["counts"]["minillm"]["readable"]
    result["best_greedy"] = texts[max(range(len(texts)), key=lambda i: judged["per_prompt"]["minillm"][i]
                                      ["rougeL_vs_teacher"])]
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.demo.frontier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished demo run (its data/ folder is read)")
    p.add_argument("--teacher", default=".cache/minillm/demo/smollm2-135m-instruct")
    p.add_argument("--out", required=True, help="JSON file for the measured table (rewritten after each variant)")
    p.add_argument("--variants", required=True,
                   help="JSON list of variants: keep, choice, tied, steps, lr, data (t1 or low), init_only")
    p.add_argument("--low-temperature", type=float, default=0.0,
                   help="> 0: also sample the teacher's training answers at this temperature (variants data=low)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-length", type=int, default=80)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from ..config import ModelConfig
    from ..models import load_tokenizer

    run, teacher_dir = Path(args.run), Path(args.teacher)
    tok = load_tokenizer(ModelConfig(path=str(teacher_dir)))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    heldout = _rows(run / "data" / "teacher_heldout.jsonl")
    train = _rows(run / "data" / "teacher_train.jsonl")
    ctx: dict[str, Any] = {"tokenizer": tok, "teacher": teacher, "teacher_dir": teacher_dir,
                           "work": run / "frontier-students", "max_new_tokens": args.max_new_tokens,
                           "max_prompt_length": args.max_prompt_length, "prompts": [r["prompt"] for r in heldout],
                           "heldout_pairs": _pairs(tok, heldout, args.max_prompt_length),
                           "train_pairs_t1": _pairs(tok, train, args.max_prompt_length)}
    with torch.no_grad():
        texts = []
        for b in prompt_batches(tok, ctx["prompts"], args.max_prompt_length, 16, "cpu"):
            out = teacher.generate(**b, do_sample=False, max_new_tokens=args.max_new_tokens,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts += [t.strip() for t in tok.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True)]
        ctx["teacher_greedy"] = texts
        if args.low_temperature > 0:
            torch.manual_seed(10)
            low = []
            for b in prompt_batches(tok, [r["prompt"] for r in train], args.max_prompt_length, 16, "cpu"):
                out = teacher.generate(**b, do_sample=True, temperature=args.low_temperature, top_k=0, top_p=1.0,
                                       max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id)
                low += [t.strip() for t in tok.batch_decode(out[:, b["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)]
            ctx["train_pairs_low"] = _pairs(tok, [{**r, "output": o} for r, o in zip(train, low)],
                                            args.max_prompt_length)
    out_path = Path(args.out)
    table = json.loads(out_path.read_text()) if out_path.exists() else {"variants": []}
    table["conditions"] = {
        "run": str(run), "train_answers": len(train), "heldout_prompts": len(heldout),
        "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "low_temperature": args.low_temperature or None}
    for v in json.loads(args.variants):
        load_before = os.getloadavg()[0]
        result = run_variant(v, ctx)
        result["load_average_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        print(json.dumps(result), flush=True)
        table["variants"].append(result)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
