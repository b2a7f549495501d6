"""The wire format between ``minillm-teacher-serve`` and :class:`minillm.serve.remote.RemoteTeacher`.

Bodies are safetensors files (binary, no JSON floats): a request holds ``input_ids`` and ``attention_mask``
[B, S] (int64) and optionally ``position_ids``; its string metadata holds the options (:data:`OPTION_KEYS`). A
response holds what was asked for:

* ``hidden`` [B, S, H]: the final hidden states exactly as :func:`minillm.losses.heads.hidden_and_head` returns
  them (after the final norm), in ``hidden_dtype`` (fp32, bf16 or fp16);
* ``token_logprobs`` [B, S-1] (fp32): log p(x_{t+1} | x_≤t) at ``temperature``;
* ``topk_logprobs`` / ``topk_ids`` [B, S, k]: the k largest log-probabilities at ``temperature`` and their ids.

Why hidden states: H numbers per token instead of V (896 vs 151,936 for Qwen2.5-0.5B), and with the teacher's LM
head applied locally the losses over the full vocabulary are exact, where top-k log-probs are an approximation.
"""

from __future__ import annotations

import hashlib
import json

import torch

API = "v1"
OUTPUTS = ("hidden", "token_logprobs", "topk")
HIDDEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTION_KEYS = ("outputs", "hidden_dtype", "temperature", "top_k")
TOKEN_ENV = "MINILLM_TEACHER_TOKEN"


class ProtocolError(ValueError):
    """A malformed request or response body; the message names what is wrong (the server answers 400 with it)."""


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def decode(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, string metadata) of a safetensors body, or a ProtocolError saying why it is not one."""
    from safetensors.torch import load

    if len(body) < 8:
        raise ProtocolError(f"the body ({len(body)} bytes) is not a safetensors file (send input_ids and "
                            "attention_mask as int64 tensors, saved with safetensors.torch.save)")
    try:
        header_len = int.from_bytes(body[:8], "little")
        header = json.loads(body[8: 8 + header_len])
        tensors = load(body)
    except Exception as error:  # noqa: BLE001 — any parse failure is the sender's malformed body
        raise ProtocolError(f"the body is not a valid safetensors file: {error}") from None
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def request_options(metadata: dict[str, str], query: dict[str, str] | None = None) -> dict:
    """The options of a request (query parameters win over the body's metadata), checked and typed."""
    raw = {**metadata, **(query or {})}
    unknown = sorted(set(raw) - set(OPTION_KEYS))
    if unknown:
        raise ProtocolError(f"unknown option(s) {unknown}; the options are {list(OPTION_KEYS)}")
    outputs = [o for o in raw.get("outputs", "hidden").split(",") if o]
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad or not outputs:
        raise ProtocolError(f"outputs={raw.get('outputs')!r}: pick one or more of {list(OUTPUTS)}, comma-separated")
    hidden_dtype = raw.get("hidden_dtype", "fp32")
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ProtocolError(f"hidden_dtype={hidden_dtype!r}: one of {list(HIDDEN_DTYPES)}")
    try:
        temperature = float(raw.get("temperature", "1.0"))
        top_k = int(raw.get("top_k", "0"))
    except ValueError as error:
        raise ProtocolError(f"temperature / top_k: {error}") from None
    if not temperature > 0:
        raise ProtocolError(f"temperature={temperature}: must be > 0")
    if "topk" in outputs and top_k <= 0:
        raise ProtocolError("outputs includes topk: set top_k to a positive number of entries")
    return {"outputs": outputs, "hidden_dtype": hidden_dtype, "temperature": temperature, "top_k": top_k}


def check_inputs(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask, position_ids or None) of a request, or a ProtocolError naming the problem."""
    unknown = sorted(set(tensors) - {"input_ids", "attention_mask", "position_ids"})
    if unknown:
        raise ProtocolError(f"unexpected tensor(s) {unknown}; send input_ids, attention_mask and optionally "
                            "position_ids")
    for name in ("input_ids", "attention_mask"):
        if name not in tensors:
            raise ProtocolError(f"the body has no `{name}` tensor")
    ids, mask, positions = tensors["input_ids"], tensors["attention_mask"], tensors.get("position_ids")
    for name, t in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
        if t is None:
            continue
        if t.dtype not in (torch.int64, torch.int32) or t.dim() != 2:
            raise ProtocolError(f"`{name}` must be a 2-D int64 tensor [batch, length]; got {t.dtype} "
                                f"{tuple(t.shape)}")
        if t.shape != ids.shape:
            raise ProtocolError(f"`{name}` has shape {tuple(t.shape)} but input_ids {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ProtocolError("input_ids is empty")
    return ids.long(), mask.long(), positions.long() if positions is not None else None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the token → id map and the EOS/BOS ids: equal for tokenizers that give the same ids (the only
    thing the two ends exchange), whatever files they were loaded from."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id},
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
