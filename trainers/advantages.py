"""Group-relative advantages: pure functions `fn(rewards [N], group_ids [N], cfg) -> advantages [N]`.

Rows of a group are contiguous (the RolloutBatch contract); group statistics are computed with
scatter-adds over the group index, not Python loops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rl.registries import ADVANTAGES

if TYPE_CHECKING:
    from rl.config.algorithm import DrGRPOAdvantage, GRPOAdvantage, RLOOAdvantage


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, index = torch.unique_consecutive(group_ids, return_inverse=True)
    return index, int(index.max()) + 1 if index.numel() else 0


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (group mean, unbiased group std, group size), each [N]. A group of one has std 1."""
    index, groups = _group_index(group_ids)
    r = rewards.double()
    count = torch.zeros(groups, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(groups, dtype=torch.float64).scatter_add_(0, index, r) / count
    sq = torch.zeros(groups, dtype=torch.float64).scatter_add_(0, index, (r - mean[index]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(count))
    return mean[index], std[index], count[index]


@ADVANTAGES.register("grpo")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: GRPOAdvantage) -> torch.Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps)  (DeepSeekMath, arXiv 2402.03300, eq. in §4.1.2).

    std is Bessel-corrected (verl); `std_scope: batch` divides by the whole batch's std instead.
    A group of size 1 has mean 0 and std 1 (A = R), as in verl. Equal rewards give A = 0 exactly.
    """
    mean, std, count = group_stats(rewards, group_ids)
    mean = torch.where(count > 1, mean, torch.zeros_like(mean))
    if cfg.std_scope == "batch":
        std = rewards.double().std().expand_as(std) if rewards.numel() > 1 else torch.ones_like(std)
    return ((rewards.double() - mean) / (std + cfg.eps)).float()


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: DrGRPOAdvantage) -> torch.Tensor:
    """A_i = R_i - mean_g R  (Dr.GRPO, arXiv 2503.20783: no std division, which biases toward easy/hard groups)."""
    mean, _, _ = group_stats(rewards, group_ids)
    return (rewards.double() - mean).float()


@ADVANTAGES.register("rloo")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: RLOOAdvantage) -> torch.Tensor:
    """A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean_g R)  (RLOO, arXiv 2402.14740); 0 for G = 1."""
    mean, _, count = group_stats(rewards, group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    return (scale * (rewards.double() - mean)).float()
