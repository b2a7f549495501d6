"""Greedy answers of the demo's models to the held-out prompts, for people to read.

The scored protocol stays sampling at T = 1 (minillm-eval, the paper's protocol); a 135M teacher's T = 1 samples
wander and a small student's more so, so the report also shows each model's most likely answer (greedy decoding).
The prompts are the evaluation's: the ``prompt`` field of the teacher's held-out answers, tokenised without special
tokens and cut to their first ``max_prompt_length`` tokens, left-padded; answers are decoded without special
tokens and stripped, exactly like minillm-eval's samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def prompt_batches(tokenizer, prompts: Sequence[str], max_prompt_length: int, batch_size: int,
                   device: str) -> list[dict[str, Any]]:
    """Left-padded ``input_ids``/``attention_mask`` batches of ``prompts`` in order."""
    import torch

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"][:max_prompt_length] for p in prompts]
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        batches.append({
            "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in chunk], dtype=torch.long,
                                      device=device),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk],
                                           dtype=torch.long, device=device),
        })
    return batches


def greedy_answers(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int, max_prompt_length: int,
                   batch_size: int, device: str = "cpu", dtype: str = "fp32") -> list[str]:
    """One greedy answer per prompt from the model in ``model_dir`` (in prompt order)."""
    from ..config import ModelConfig
    from ..evaluation.generation import generate_texts
    from ..models import load_model, load_tokenizer

    cfg = ModelConfig(path=str(model_dir), dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, trainable=False).to(device)
    batches = prompt_batches(tokenizer, prompts, max_prompt_length, batch_size, device)
    # HF generate: the rollout engine's greedy path is the same argmax, but HF needs no CUDA to be exercised
    return generate_texts(model, tokenizer, batches, max_new_tokens=max_new_tokens, do_sample=False, engine="hf")


def write_greedy(models: dict[str, Path], heldout_file: Path, out_file: Path, *, max_new_tokens: int,
                 max_prompt_length: int, batch_size: int, device: str, dtype: str) -> None:
    """``{"prompts": [...], "answers": {model: [...]}}`` for every model, written atomically to ``out_file``."""
    rows = [json.loads(line) for line in heldout_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows]
    answers = {}
    for name, model_dir in models.items():
        answers[name] = greedy_answers(model_dir, prompts, max_new_tokens=max_new_tokens,
                                       max_prompt_length=max_prompt_length, batch_size=batch_size, device=device,
                                       dtype=dtype)
        print(f"    | {name}: {len(answers[name])} greedy answers", flush=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text(json.dumps({"prompts": prompts, "answers": answers}, ensure_ascii=False, indent=1) + "\n",
                   encoding="utf-8")
    tmp.replace(out_file)
