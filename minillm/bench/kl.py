"""The single-step KL at a fixed shape, plain vs chunked: peak memory and speed (``minillm-bench --kl-target``).

Issue target: at batch 16 × 512 tokens × 50,272 vocabulary the chunked single-step KL (forward + backward into the
student's hidden states and LM head) must need ≤ ¼ of the plain version's peak memory at ≥ 0.8× its speed. Only
the hidden sizes and the vocabulary matter, so the measurement builds random hidden states and LM heads of the
models' sizes instead of the models (no 13B teacher is needed to measure its head).

Peak memory is what the step needs *above its inputs* (hidden states, heads, mask): on CUDA
``max_memory_allocated`` after a reset, minus what was allocated before; on CPU, where torch keeps no allocator
statistics, each variant runs in a fresh process and reports its peak resident set (``ru_maxrss``) growth over
the step.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from ..losses import chunked as chunked_losses
from .. import losses

__all__ = ["measure_kl_target"]


def _inputs(batch: int, length: int, vocab: int, student_hidden: int, teacher_hidden: int, device: str,
            dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    s_hidden = randn(batch, length, student_hidden).requires_grad_(True)
    t_hidden = randn(batch, length, teacher_hidden)
    s_head = torch.nn.Linear(student_hidden, vocab, bias=False).to(device=device, dtype=dtype)
    t_head = torch.nn.Linear(teacher_hidden, vocab, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():  # N(0, 1/H) weights: logits of unit scale. In place: no transient copy may raise the
        # CPU baseline (a lifetime peak) above what is resident when the step starts
        s_head.weight.normal_(0.0, student_hidden ** -0.5, generator=g if device == "cpu" else None)
        t_head.weight.normal_(0.0, teacher_hidden ** -0.5, generator=g if device == "cpu" else None)
    mask = torch.ones(batch, length, device=device)
    return s_hidden, t_hidden, s_head, t_head, mask


VARIANTS = ("plain", "chunked", "chunked_checkpointed")  # chunked: the default (fused) backward


def _step(variant: str, s_hidden, t_hidden, s_head, t_head, mask, chunk_size: int) -> float:
    """Forward + backward of the single-step KL (gradients into the student's hidden states and head)."""
    s_hidden.grad = None
    s_head.weight.grad = None
    if variant != "plain":
        kl = chunked_losses.chunked_single_step_kl(s_hidden, s_head, mask, teacher_hidden=t_hidden, teacher_head=t_head,
                                           chunk_size=chunk_size, fused=variant == "chunked")
    else:
        with torch.no_grad():
            t_logits = t_head(t_hidden)
        kl = losses.single_step_kl(s_head(s_hidden), t_logits, mask)
    kl.backward()
    return float(kl)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(variant: str, batch: int, length: int, vocab: int, student_hidden: int, teacher_hidden: int,
             chunk_size: int, device: str, dtype_name: str, repeats: int, seed: int) -> dict[str, Any]:
    """One variant in this process: median seconds of ``repeats`` steps after a warm-up, peak bytes above inputs."""
    dtype = getattr(torch, dtype_name)
    args = _inputs(batch, length, vocab, student_hidden, teacher_hidden, device, dtype, seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the inputs are resident by now
    value = _step(variant, *args, chunk_size)  # warm-up: also the step whose peak is measured
    _sync(device)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        _step(variant, *args, chunk_size)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2], "peak_bytes_above_inputs": int(peak), "kl": value,
            "peak_method": "cuda max_memory_allocated" if cuda else "ru_maxrss growth in a fresh process"}


def _measure_in_child(variant: str, kwargs: dict) -> dict[str, Any]:
    """:func:`_measure` in a fresh interpreter (a plain subprocess: unlike multiprocessing's spawn, it does not
    re-import the caller's main module, so it works from any script or notebook)."""
    code = ("import json, sys; from minillm.bench.kl import _measure; "
            "print(json.dumps(_measure(sys.argv[1], **json.loads(sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", code, variant, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"minillm.bench.kl: the {variant} measurement process failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_kl_target(*, batch: int, length: int, vocab: int, student_hidden: int, teacher_hidden: int,
                      chunk_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 1,
                      seed: int = 0, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Plain and chunked single-step KL at [batch, length, vocab]; their peak memory, seconds and the ratios.

    ``chunked`` is the default (fused) backward, ``chunked_checkpointed`` the one that reruns the heads in
    backward (what ZeRO-3 partitioned heads use); ratios are against ``plain``, which always runs."""
    unknown = set(variants) - set(VARIANTS)
    if unknown or "chunked" not in variants:
        raise ValueError(f"minillm.bench.kl: variants {sorted(variants)} must include 'chunked' and come from "
                         f"{VARIANTS}")
    kwargs = dict(batch=batch, length=length, vocab=vocab, student_hidden=student_hidden,
                  teacher_hidden=teacher_hidden, chunk_size=chunk_size, device=device,
                  dtype_name=str(dtype).replace("torch.", ""), repeats=repeats, seed=seed)
    out: dict[str, Any] = {"shape": {"batch": batch, "length": length, "vocab": vocab,
                                     "student_hidden": student_hidden, "teacher_hidden": teacher_hidden,
                                     "chunk_size": chunk_size, "dtype": kwargs["dtype_name"]}}
    for name in ("plain", *[v for v in VARIANTS[1:] if v in variants]):
        if device.startswith("cuda"):
            out[name] = _measure(name, **kwargs)
            torch.cuda.empty_cache()
        else:  # a fresh process per variant: ru_maxrss is a lifetime peak
            out[name] = _measure_in_child(name, kwargs)
    plain = out["plain"]
    for name, prefix in (("chunked", ""), ("chunked_checkpointed", "checkpointed_")):
        if name in out:
            peak = out[name]["peak_bytes_above_inputs"]
            out[f"{prefix}memory_ratio"] = peak / max(plain["peak_bytes_above_inputs"], 1)
            out[f"{prefix}speed_ratio"] = plain["seconds"] / out[name]["seconds"]
    out["meets_target"] = out["memory_ratio"] <= 0.25 and out["speed_ratio"] >= 0.8
    out["target"] = "chunked peak <= 1/4 of plain, at >= 0.8x its speed"
    return out
