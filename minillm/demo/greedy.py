"""Greedy answers of the demo's models to the held-out prompts, for people to read.

The scored protocol stays sampling at T = 1 (minillm-eval, the paper's protocol); a 135M teacher's T = 1 samples
wander and a small student's more so, so the report also shows each model's most likely answer (greedy decoding).
The prompts are the evaluation's: the ``prompt`` field of the teacher's held-out answers, tokenised without special
tokens and cut to their first ``max_prompt_length`` tokens, left-padded; answers are decoded without special
tokens and stripped, exactly like minillm-eval's samples.

Greedy decoding of a 135M model (and more so of a mode-seeking MiniLLM student) falls into loops ("a cup of a msc, a
msc, a msc, ..."), so the shown answers use the repetition penalty of CTRL (Keskar et al. 2019, §4.1): before the
argmax, the logit of every token already in the prompt or the answer is divided by θ if positive and multiplied by
θ if negative (θ = 1: plain greedy). Padding is not "already seen", so an answer does not depend on its batch.
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


class SeenTokenPenalty:
    """CTRL's repetition penalty as an HF logits processor, counting only real (unpadded) prompt tokens.

    ``prompt_mask`` [B, W] is the left-padded prompt batch's attention mask; every position after it (the answer
    so far) counts. HF's own ``repetition_penalty`` also penalises the pad token of padded rows, which for models
    whose pad is EOS makes an answer depend on the other prompts of its batch.
    """

    def __init__(self, penalty: float, prompt_mask):
        self.penalty = penalty
        self.prompt_mask = prompt_mask.bool()

    def __call__(self, input_ids, scores):
        import torch

        valid = torch.ones_like(input_ids, dtype=torch.bool)
        valid[:, :self.prompt_mask.shape[1]] = self.prompt_mask
        counts = torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
        counts.scatter_add_(1, input_ids, valid.long())
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(counts > 0, penalised, scores)


def greedy_answers(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int, max_prompt_length: int,
                   batch_size: int, device: str = "cpu", dtype: str = "fp32",
                   repetition_penalty: float = 1.0) -> list[str]:
    """One greedy answer per prompt from the model in ``model_dir`` (in prompt order); ``repetition_penalty`` θ:
    see the module docstring (1.0: plain argmax)."""
    import torch
    from transformers import LogitsProcessorList

    from ..config import ModelConfig
    from ..models import load_model, load_tokenizer

    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    cfg = ModelConfig(path=str(model_dir), dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, trainable=False).to(device).eval()
    texts: list[str] = []
    # HF generate: the rollout engine's greedy path is the same argmax, but HF needs no CUDA to be exercised
    with torch.no_grad():
        for batch in prompt_batches(tokenizer, prompts, max_prompt_length, batch_size, device):
            processors = LogitsProcessorList([SeenTokenPenalty(repetition_penalty, batch["attention_mask"])]
                                             if repetition_penalty != 1.0 else [])
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, logits_processor=processors,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            responses = out[:, batch["input_ids"].shape[1]:]
            texts += [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
    return texts


def write_greedy(models: dict[str, Path], heldout_file: Path, out_file: Path, *, max_new_tokens: int,
                 max_prompt_length: int, batch_size: int, device: str, dtype: str,
                 repetition_penalty: float = 1.0) -> None:
    """``{"prompts": [...], "answers": {model: [...]}}`` for every model, written atomically to ``out_file``."""
    rows = [json.loads(line) for line in heldout_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows]
    answers = {}
    for name, model_dir in models.items():
        answers[name] = greedy_answers(model_dir, prompts, max_new_tokens=max_new_tokens,
                                       max_prompt_length=max_prompt_length, batch_size=batch_size, device=device,
                                       dtype=dtype, repetition_penalty=repetition_penalty)
        print(f"    | {name}: {len(answers[name])} greedy answers", flush=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text(json.dumps({"prompts": prompts, "answers": answers}, ensure_ascii=False, indent=1) + "\n",
                   encoding="utf-8")
    tmp.replace(out_file)
