"""AdamW with decay/no-decay groups and the reference learning-rate schedules."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases or norm weights (the reference keys this on GPT-2 names; the rank of the
    tensor is the architecture-independent form of the same rule)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters into empty tensors; `ds_shape` keeps the real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(float(cfg.betas[0]), float(cfg.betas[1])), eps=cfg.eps)


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR at optimizer step ``step`` as a fraction of ``cfg.lr``.

    constant: linear warm-up, then flat (HF constant-with-warmup, the reference MiniLLM schedule).
    cosine: warm-up, then cosine from lr to min_lr at ``total_steps`` (the reference SFT schedule is
    CosineAnnealingLR(T_max=total, eta_min=1e-7) with no warm-up).
    linear: warm-up, then linear to 0. noam: warm-up, then (warmup/step)^0.5 decay.
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return step / warmup  # HF's *_with_warmup schedules: the first step runs at lr 0
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.scheduler == "cosine":
        floor = cfg.min_lr / cfg.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if cfg.scheduler == "noam":
        return math.sqrt(max(1, warmup) / max(step + 1, max(1, warmup)))
    raise ValueError(f"optim.scheduler: unknown schedule {cfg.scheduler!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, total_steps))
