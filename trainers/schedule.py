"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_factor(update: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base learning rate at optimizer update `update` (0-based)."""
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: Any, cfg: Any, total_updates: int) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # fused/foreach AdamW kernels: one pass over all parameters instead of a Python loop per tensor.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_factor(u, cfg.warmup_steps, total_updates, cfg.lr_schedule))
    return optimizer, scheduler
