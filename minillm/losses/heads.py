"""Hidden states + LM head for the chunked losses (DESIGN §4 memory note).

The ``chunked_*`` functions of :mod:`minillm.losses` take the last hidden states [B, L, H] and a callable head
``h [N, H] → logits [N, V]``. This module gets both from a stock HF causal LM:

* one forward with ``output_hidden_states=True`` and ``logits_to_keep=1``: the model computes logits for the
  last position only, and its last hidden state (after the final norm / projection, as HF records it) is what
  the LM head reads;
* the head is the model's own output-embedding module (so DeepSpeed ZeRO-3 parameter hooks fire), followed by
  the family's own logit post-processing where it has one (:func:`logit_postprocessing`: Gemma-2/3's soft-capping,
  Granite's and HyperCLOVA X's ``logits_scaling``, Cohere's ``logit_scale``) and the vocabulary trim
  (:class:`minillm.models.VocabAlignment`);
* the first time a model is seen, head(last hidden) is checked against the logit the model itself returned, so
  an unknown post-processing is caught instead of giving wrong losses. The trainers probe each model once at
  start (:func:`chunked_head_matches`) and fall back to the plain losses with one warning when it fails.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Callable

import torch
from torch import Tensor

from . import chunked as chunked_losses

__all__ = ["LMHead", "HeadMismatchError", "sequence_inputs", "chunked_head_matches", "hidden_and_head", "lm_head", "logit_postprocessing",
           "response_hidden", "global_chunk_count"]

_VERIFIED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``forward`` takes ``logits_to_keep`` (HF ≥ 4.50 models), which avoids [B, P, V] prefill logits."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class HeadMismatchError(ValueError):
    """A model's logits are not what its LM head (and known post-processing) gives from its last hidden state."""


# model_type → how the family rescales its logits after the head (read from its modeling code, transformers 5)
_DIVIDE_BY_LOGITS_SCALING = {"granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                             "granitemoe_swa"}
_MULTIPLY_BY_LOGITS_SCALING = {"hyperclovax"}
_MULTIPLY_BY_LOGIT_SCALE = {"cohere", "cohere2", "cohere2_moe"}


def logit_postprocessing(module) -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """The family's own map from lm_head outputs to its logits (None: none) and a description of it.

    Soft-capping (``final_logit_softcapping``: cap·tanh(z/cap)) is applied the same way by every family that has
    the attribute (Gemma-2/3/3n/4, Mistral-Large-4); the scales differ by family (Granite divides by
    ``logits_scaling``, HyperCLOVA X multiplies by it), so those are matched on ``model_type``."""
    config = getattr(module, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None:
        return None, ""
    kind = getattr(text, "model_type", "")
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        cap = float(cap)
        return (lambda z: torch.tanh(z / cap) * cap), f"soft-capping at {cap}"
    scaling = getattr(text, "logits_scaling", None)
    if kind in _DIVIDE_BY_LOGITS_SCALING and scaling not in (None, 1, 1.0):
        scaling = float(scaling)
        return (lambda z: z / scaling), f"logits / {scaling}"
    if kind in _MULTIPLY_BY_LOGITS_SCALING and scaling not in (None, 1, 1.0):
        scaling = float(scaling)
        return (lambda z: z * scaling), f"logits x {scaling}"
    scale = getattr(text, "logit_scale", None)
    if kind in _MULTIPLY_BY_LOGIT_SCALE and isinstance(scale, (int, float)) and scale != 1:
        scale = float(scale)
        return (lambda z: z * scale), f"logits x {scale}"
    return None, ""


def _unwrap(model):
    return getattr(model, "module", model)  # DeepSpeed engines keep the HF model in .module


def hidden_and_head(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                    position_ids: Tensor | None = None, *, trim: Callable[[Tensor], Tensor] = lambda x: x,
                    autocast=None) -> tuple[Tensor, "LMHead"]:
    """One forward → (last hidden states [B, S, H], head ``h → trim(lm_head(h))``). Gradients flow as usual."""
    module = _unwrap(model)
    head = lm_head(model, trim=trim, autocast=autocast)  # fails before the forward when there is no head
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(module) else {}
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True, **kwargs)
    hidden = out.hidden_states[-1]

    if module not in _VERIFIED:
        with torch.no_grad():
            mine, theirs = head(hidden[:, -1]), trim(out.logits[:, -1])
        if mine.shape != theirs.shape:
            raise HeadMismatchError(f"minillm.losses.heads: {type(module).__name__}'s lm_head(last hidden state) has shape "
                             f"{tuple(mine.shape)} but its logits {tuple(theirs.shape)}; set "
                             "minillm.chunked_losses=false and kd.chunked=false to use the plain losses")
        gap, tolerance = _log_prob_gap(mine, theirs)
        if not gap <= tolerance:  # NaN included
            raise HeadMismatchError(
                             f"minillm.losses.heads: {type(module).__name__}'s logits are not lm_head(last hidden "
                             f"state) (the model post-processes them in a way minillm does not know: their "
                             f"log-probabilities differ by up to {gap:.3g}, more than the {tolerance:.3g} that "
                             f"{mine.dtype}/{theirs.dtype} rounding allows); set minillm.chunked_losses=false and "
                             "kd.chunked=false to use the plain losses")
        _VERIFIED.add(module)
    return hidden, head


# Ulps of the largest logit that two evaluations of one head may differ by: half-precision GEMMs round their
# output (1/2 ulp), and on CUDA cuBLAS picks kernels by shape and may split the reduction with half-precision
# partial sums (torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction, on by default);
# log-softmax adds the log-sum-exp's own error.
_HEAD_CHECK_ULPS = 8


def _log_prob_gap(mine: Tensor, theirs: Tensor) -> tuple[float, float]:
    """(max |log_softmax(mine) − log_softmax(theirs)|, what rounding allows) over [N, V] logits of one head.

    Log-probabilities, not logits: they are what every loss reads, and a model that only shifts its logits
    changes none of them. The allowance scales with the coarser dtype's epsilon and the largest logit
    (1e-3 relative at least, for fp32 on TF32 GPUs): half-precision logits of one head may differ by a few of
    their ulps, while soft-capping or a logit scale moves the log-probs by far more than that unless the logits
    are too small for it to matter."""
    eps = max(torch.finfo(mine.dtype).eps if mine.is_floating_point() else 0.0,
              torch.finfo(theirs.dtype).eps if theirs.is_floating_point() else 0.0)
    mine, theirs = torch.log_softmax(mine.float(), -1), theirs.float()
    log_theirs = torch.log_softmax(theirs, -1)
    # equal entries (masked −inf ones included) agree; any other non-finite difference is a NaN gap: a failure
    gap = torch.where(mine == log_theirs, torch.zeros_like(mine), (mine - log_theirs).abs()).amax()
    magnitude = torch.where(theirs.isfinite(), theirs.abs(), torch.zeros_like(theirs)).amax() + 1.0
    tolerance = 1e-3 + max(1e-3, _HEAD_CHECK_ULPS * eps) * magnitude
    gap, tolerance = torch.stack([gap, tolerance]).tolist()  # one host sync, once per model
    return gap, tolerance


class LMHead(torch.nn.Module):
    """``h [N, H] → trim(lm_head(h))`` through the model's own output-embedding module.

    A module (not a closure) so the chunked losses can take its gradients in forward (:mod:`minillm.losses.fused_head`);
    the wrapped head stays the model's own submodule, so ZeRO-3 hooks fire and tied embeddings stay tied.
    """

    def __init__(self, head: torch.nn.Module, trim: Callable[[Tensor], Tensor] = lambda x: x, autocast=None,
                 post: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.head, self.trim, self.autocast, self.post = head, trim, autocast, post

    def forward(self, h: Tensor) -> Tensor:
        with (self.autocast() if self.autocast is not None else contextlib.nullcontext()):
            logits = self.head(h)
            return self.trim(self.post(logits) if self.post is not None else logits)


def lm_head(model, *, trim: Callable[[Tensor], Tensor] = lambda x: x, autocast=None) -> LMHead:
    """``h [N, H] → trim(lm_head(h))`` through the model's own output-embedding module (ZeRO-3 hooks fire).

    Used alone for hidden states kept from an earlier forward (the teacher's, reused across PPO epochs); that
    forward went through :func:`hidden_and_head`, which checked the head against the model's own logits.
    """
    module = _unwrap(model)
    head_module = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head_module is None:
        raise ValueError(f"minillm.losses.heads: {type(module).__name__} has no output embeddings (LM head); set "
                         "minillm.chunked_losses=false / kd.chunked=false for it")
    return LMHead(head_module, trim, autocast, post=logit_postprocessing(module)[0])


_WARNED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def chunked_head_matches(model, switch: str, *, trim: Callable[[Tensor], Tensor] = lambda x: x, autocast=None,
                         device: torch.device | None = None) -> bool:
    """Probe ``model`` once with a 4-token input: does the chunked path reproduce its logits? On a mismatch, log one
    warning naming ``switch`` (the config key the trainer turns off) and return False, so the run continues on the
    plain losses instead of stopping. Every rank must call it (the probe is a forward: collective under ZeRO-3)."""
    module = _unwrap(model)
    if module in _VERIFIED:
        return True
    if device is None:
        device = next(module.parameters()).device
    probe = torch.arange(4, dtype=torch.long, device=device)[None]
    try:
        with torch.no_grad():
            hidden_and_head(model, probe, torch.ones_like(probe), trim=trim, autocast=autocast)
    except HeadMismatchError as e:
        if module not in _WARNED:
            _WARNED.add(module)
            from ..tracking import get_logger

            get_logger().warning("%s: %s. Falling back to the plain losses for this run (%s=false: full [B, L, V] "
                                 "logits, more memory)", switch, e, switch)
        return False
    return True


def sequence_inputs(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    ) -> dict[str, Tensor]:
    """Model inputs for [prompt; response]: attention mask and explicit position ids (left padding shifts them).

    Response columns after EOS are attended to as ordinary tokens; they come after every valid position, so
    causality keeps them out of every scored prediction.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def response_hidden(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, *,
                    trim: Callable[[Tensor], Tensor] = lambda x: x, autocast=None
                    ) -> tuple[Tensor, "LMHead"]:
    """[B, L, H] hidden states whose head output predicts each response token (row t predicts y_t), and the head.

    The chunked twin of :func:`minillm.generation.rollout.response_logits` (same inputs, positions and layout)."""
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids)
    hidden, head = hidden_and_head(model, **inputs, trim=trim, autocast=autocast)
    p, length = prompt_ids.shape[1], response_ids.shape[1]
    return hidden[:, p - 1: p - 1 + length], head


def global_chunk_count(valid: Tensor, chunk_size: int, strategy=None) -> int:
    """Head calls for this mask, the max over data-parallel ranks (ZeRO-3 needs the same count everywhere)."""
    count = chunked_losses.chunk_count(valid, chunk_size)
    if strategy is None or getattr(strategy, "world_size", 1) <= 1:
        return count
    total = torch.tensor([count], dtype=torch.long, device=strategy.device)
    strategy.all_reduce(total, "max")
    return int(total.item())
