"""Collators: right-padded SFT batches and left-padded prompt batches.

SFT batches are right-padded: every sequence starts at position 0, so position ids need no care, and
padding is excluded by the attention mask and by label −100. Prompt batches (MiniLLM rollouts, dev and
evaluation generation) are left-padded, so that every prompt ends at the last column and generated tokens
are appended in the same column for the whole batch (DESIGN §3, lmops-notes §2.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

IGNORE_INDEX = -100  # label value that the loss skips (the torch / HF convention)


def resolve_pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token.

    Causal LMs often ship without a pad token; like the reference code we then pad with EOS. This is
    safe because padded slots are always masked (attention_mask 0, label −100), so their content never
    reaches a loss.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError(f"tokenizer `{getattr(tokenizer, 'name_or_path', '?')}` has neither a pad nor an EOS token; "
                         "set tokenizer.pad_token before building batches")
    return int(pad)


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class SFTCollator:
    """Right-pads SFT items ``{input_ids [L], labels [L]}`` into a batch.

    Returns ``input_ids`` [B, T] (pad id after the end), ``attention_mask`` [B, T] (1 on tokens),
    ``labels`` [B, T] (−100 on padding and on the prompt), T = the longest item (rounded up to
    ``pad_to_multiple_of`` when set, which keeps shapes few for compiled kernels), and ``index`` [B] when every
    item carries its dataset position (:class:`SFTDataset` items do).
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        width = _round_up(max(len(it["input_ids"]) for it in items), self.pad_to_multiple_of)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if all("index" in it for it in items):  # positions in the training set (kd.teacher_cache reads by them)
            batch["index"] = torch.as_tensor([int(it["index"]) for it in items], dtype=torch.long)
        return batch


@dataclass
class PromptCollator:
    """Left-pads prompt items ``{input_ids [P], references, index}`` into a generation batch.

    Returns ``input_ids`` [B, T] (pad id before the prompt), ``attention_mask`` [B, T] (1 on prompt
    tokens), ``references`` (list of B lists of strings, passed through) and ``index`` [B] (the record
    index of each prompt, so that samples can be traced back to their references).
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        width = _round_up(max(len(it["input_ids"]) for it in items), self.pad_to_multiple_of)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            if n:
                input_ids[row, width - n:] = torch.as_tensor(it["input_ids"], dtype=torch.long)
                attention_mask[row, width - n:] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "references": [list(it.get("references", [])) for it in items],
                "index": torch.as_tensor([int(it.get("index", -1)) for it in items], dtype=torch.long)}
