"""The first-call check of ``minillm.losses.heads.hidden_and_head`` in half precision.

The check compares the head applied to the last hidden state with the logits the model itself returned. In bf16
and fp16 two evaluations of one head legitimately differ by a few ulps: on CUDA, cuBLAS chooses kernels by
shape and may split the reduction with half-precision partial sums (``allow_bf16/fp16_reduced_precision_
reduction``, on by default). The models below reproduce that on CPU: their forward computes the logits with a
4-way split reduction in the model's dtype. They must pass; models that really post-process their logits (a
real Gemma-2 with its final soft-capping at 30, a Cohere-style logit scale) must still fail in bf16.
"""

from __future__ import annotations

import pytest
import torch

from minillm.losses import heads as chunking
from minillm.models import tiny_llama

V = 256


def split_reduction_logits(model, splits: int = 4):
    """Make ``model``'s forward return lm_head's logits computed as a sum of ``splits`` partial products, each
    rounded to the model's dtype (what a split-K GEMM with reduced-precision reduction does)."""

    def hook(module, args, output):
        weight = module.lm_head.weight
        hidden = output.hidden_states[-1][:, -output.logits.shape[1]:]
        width = hidden.shape[-1] // splits
        logits = None
        for i in range(splits):
            part = hidden[..., i * width:(i + 1) * width] @ weight[:, i * width:(i + 1) * width].T
            logits = part if logits is None else logits + part
        output.logits = logits
        return output

    model.register_forward_hook(hook)
    return model


def half_model(dtype: torch.dtype, seed: int = 0):
    model = tiny_llama(vocab_size=V, hidden_size=32, seed=seed)
    with torch.no_grad():  # logits of ±10-20, as trained models give (random init gives ±0.3)
        model.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def ids(seed: int = 1):
    return torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(seed))


def head_and_model_logits(model):
    with torch.no_grad():
        out = model(input_ids=ids(), output_hidden_states=True, logits_to_keep=1)
        return model.lm_head(out.hidden_states[-1][:, -1]).float(), out.logits[:, -1].float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_pass_the_head_check_within_rounding(dtype):
    stock = half_model(dtype)
    hidden, head = chunking.hidden_and_head(stock, ids())  # the same kernel twice: bitwise equal on CPU
    assert hidden.dtype == dtype and head(hidden[:, -1]).dtype == dtype

    model = split_reduction_logits(half_model(dtype))
    mine, theirs = head_and_model_logits(model)
    # the two evaluations really differ, by more than the former fixed 1e-3 tolerance allowed ...
    assert not torch.allclose(mine, theirs, atol=1e-3, rtol=1e-3)
    assert theirs.abs().max() > 8.0
    # ... but only by rounding: a few ulps of the largest logit
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(theirs.abs().max()))
    assert (mine - theirs).abs().max() <= 4 * ulp
    hidden, head = chunking.hidden_and_head(model, ids())
    assert model in chunking._VERIFIED


def test_known_post_processing_passes_and_unknown_still_fails_in_bf16():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=30.0)  # Gemma-2's own value
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of ±20-40, where a cap of 30 bends them
        gemma.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    gemma = gemma.to(torch.bfloat16).eval()
    # Gemma-2's soft-cap is applied inside the chunked head (chunking.logit_postprocessing): the check passes
    chunking.hidden_and_head(gemma, ids())
    assert gemma in chunking._VERIFIED

    scaled = half_model(torch.bfloat16)  # a logit scale the head does not know (a milder 1.25 than Cohere's)
    scaled.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * 1.25)
                                 or output)
    with pytest.raises(ValueError, match="post-processes them"):
        chunking.hidden_and_head(scaled, ids())
