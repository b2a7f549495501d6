"""Batched sampling of responses for left-padded prompt batches (dev evaluation and minillm-eval).

Generation follows the evaluation protocol (DESIGN §6): sampling at T = 1 with top-k 0 and top-p 1 by default,
decoding without special tokens and stripping. The RNG is forked so that evaluating never changes the
training run's random stream (needed for exact resume), and the seed is offset by the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch


@dataclass
class GeneratedBatch:
    """One generation batch, on the CPU: the left-padded prompts and the sampled responses.

    ``input_ids``/``attention_mask`` [B, P] as given; ``response_ids`` [B, L] the new tokens (rows that stopped
    early are filled with the pad id after their EOS); ``texts`` the decoded, stripped responses; ``index`` [B]
    the batch's ``index`` entry when it had one (record positions), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    texts: list[str]
    index: Optional[torch.Tensor] = None


@torch.no_grad()
def generate_batches(model, tokenizer, batches: Iterable[dict[str, Any]], *, max_new_tokens: int,
                     do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     no_repeat_ngram_size: int = 0, seed: int = 10, rank: int = 0, synced_gpus: bool = False,
                     device: torch.device | None = None) -> list[GeneratedBatch]:
    """Like :func:`generate_texts`, but keeps the token ids (for teacher scoring of the samples).

    The random stream is the same as :func:`generate_texts`' for the same arguments, so both give the same
    texts.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out_batches: list[GeneratedBatch] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + rank)
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          synced_gpus=synced_gpus)
            if do_sample:
                kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
            if no_repeat_ngram_size:
                kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            responses = out[:, input_ids.shape[1]:]
            texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
            index = batch.get("index")
            out_batches.append(GeneratedBatch(input_ids.cpu(), attention_mask.cpu(), responses.cpu(), texts,
                                              index.cpu() if isinstance(index, torch.Tensor) else None))
    model.train(was_training)
    return out_batches


def generate_texts(model, tokenizer, batches: Iterable[dict[str, Any]], *, max_new_tokens: int,
                   do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   no_repeat_ngram_size: int = 0, seed: int = 10, rank: int = 0, synced_gpus: bool = False,
                   device: torch.device | None = None) -> list[str]:
    """Generate one response per prompt; returns decoded, stripped strings in batch order.

    ``batches`` yield ``input_ids`` and ``attention_mask`` (left-padded). ``synced_gpus`` must be on under
    ZeRO-3 so that ranks that finish early keep joining the parameter gathers of the others.
    """
    done = generate_batches(model, tokenizer, batches, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            no_repeat_ngram_size=no_repeat_ngram_size, seed=seed, rank=rank,
                            synced_gpus=synced_gpus, device=device)
    return [text for b in done for text in b.texts]
