"""Batched sampling of responses for left-padded prompt batches (dev evaluation and minillm-eval).

Generation follows the evaluation protocol (DESIGN §6): sampling at T = 1 with top-k 0 and top-p 1 by default,
decoding without special tokens and stripping. The RNG is forked so that evaluating never changes the
training run's random stream (needed for exact resume), and the seed is offset by the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from .settings import engine_conflict


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


def resolve_engine(engine: str, device: torch.device, *, no_repeat_ngram_size: int = 0,
                   synced_gpus: bool = False) -> str:
    """``hf`` (Hugging Face ``generate``) or ``fast`` (:func:`minillm.generation.engine.fast_mixed_sample` at α = 0: the
    student alone, with static caches and CUDA graphs on CUDA). ``auto`` picks ``fast`` on CUDA unless HF is
    needed: ``--no-repeat-ngram-size`` (HF's logits processor) or ZeRO-3 (``synced_gpus``: ranks that finish
    early must keep joining the others' parameter gathers). Both draw from the same distribution; their random
    streams differ, so a given seed gives different samples."""
    conflict = engine_conflict(engine, no_repeat_ngram_size=no_repeat_ngram_size, zero3=synced_gpus)
    if conflict:
        raise ValueError(f"minillm.evaluation: {conflict}")
    if engine == "auto":
        return "fast" if device.type == "cuda" and not no_repeat_ngram_size and not synced_gpus else "hf"
    return engine


def _fast_generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                   do_sample: bool, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[B, ≤ max_new_tokens] responses from the rollout engine at α = 0 (the global RNG, seeded by the caller)."""
    from ..generation.engine import fast_mixed_sample

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    # padded embedding rows beyond the tokenizer are no tokens: never draw them (HF generate would)
    vocab = len(tokenizer) if rows is not None and rows > len(tokenizer) else None
    out = fast_mixed_sample(model, None, input_ids, attention_mask, max_new_tokens=max_new_tokens, alpha=0.0,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad, do_sample=do_sample, score=False, vocab_size=vocab)
    return out.response_ids


@torch.no_grad()
def generate_batches(model, tokenizer, batches: Iterable[dict[str, Any]], *, max_new_tokens: int,
                     do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     no_repeat_ngram_size: int = 0, seed: int = 10, rank: int = 0, synced_gpus: bool = False,
                     device: torch.device | None = None, engine: str = "hf") -> list[GeneratedBatch]:
    """Like :func:`generate_texts`, but keeps the token ids (for teacher scoring of the samples).

    The random stream is the same as :func:`generate_texts`' for the same arguments, so both give the same
    texts. ``engine``: see :func:`resolve_engine`.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    engine = resolve_engine(engine, device, no_repeat_ngram_size=no_repeat_ngram_size, synced_gpus=synced_gpus)
    out_batches: list[GeneratedBatch] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + rank)
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            if engine == "fast":
                responses = _fast_generate(model, tokenizer, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                           do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
            else:
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
                   device: torch.device | None = None, engine: str = "hf") -> list[str]:
    """Generate one response per prompt; returns decoded, stripped strings in batch order.

    ``batches`` yield ``input_ids`` and ``attention_mask`` (left-padded). ``synced_gpus`` must be on under
    ZeRO-3 so that ranks that finish early keep joining the parameter gathers of the others.
    """
    done = generate_batches(model, tokenizer, batches, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            no_repeat_ngram_size=no_repeat_ngram_size, seed=seed, rank=rank,
                            synced_gpus=synced_gpus, device=device, engine=engine)
    return [text for b in done for text in b.texts]
