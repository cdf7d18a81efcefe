"""Optimizer (AdamW) and learning-rate schedule (linear warmup, then constant, linear or cosine decay)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from rl.config.job import TrainerConfig

DECAY_SHAPES = {"constant": lambda progress: 1.0, "linear": lambda progress: 1.0 - progress,
                "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress))}


def lr_factor(update: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base learning rate at optimizer update `update` (0-based): (u+1)/warmup during
    warmup, then the decay shape over the remaining `total - warmup` updates (reaching 0 at `total`)."""
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    return DECAY_SHAPES[kind](min(1.0, (update - warmup) / max(1, total - warmup)))


def parameter_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices only: decaying norms' gains and biases toward 0 is not regularisation
    (the usual GPT/Llama recipe)."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainerConfig,
                    total_updates: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the trainable `(name, parameter)` pairs and its LambdaLR schedule."""
    if not params:
        raise ValueError("the model has no trainable parameters")
    # foreach kernels: one pass over all parameters instead of a Python loop per tensor.
    optimizer = torch.optim.AdamW(parameter_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  foreach=True)
    scheduler = LambdaLR(
        optimizer, lambda u: lr_factor(u, cfg.warmup_steps, total_updates, cfg.lr_schedule))
    return optimizer, scheduler
