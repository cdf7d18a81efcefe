"""Reward shaping applied to the weighted total: clipping and PAR.

PAR (Preference As Reward, arXiv 2502.18770, `calculate_relative_sigmoid` in PorUna-byte/PAR):
    r_shaped = (1/M) * sum_m sigmoid(r - r_ref_m)
with the reference responses' rewards `r_ref_m` given per sample in `sample_meta["ref_rewards"]`.
It is bounded in (0, 1) and centred on the references, which blunts reward hacking of reward models.
"""

from __future__ import annotations

from typing import Any

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError


def par(rewards: torch.Tensor, ref_rewards: list[list[float]]) -> torch.Tensor:
    """[N] mean over each sample's references of sigmoid(r - r_ref)."""
    out = torch.empty_like(rewards)
    for i, refs in enumerate(ref_rewards):
        ref = torch.as_tensor(refs, dtype=rewards.dtype)
        out[i] = torch.sigmoid(rewards[i] - ref).mean()
    return out


def shape(total: torch.Tensor, batch: RolloutBatch, cfg: Any) -> torch.Tensor:
    if cfg.par:
        refs = [m.get("ref_rewards") for m in batch.sample_meta]
        if any(not r for r in refs):
            raise UserError("shaping.par needs reference rewards: give each sample a non-empty `ref_rewards` "
                            "list (a dataset column), or turn shaping.par off.")
        total = par(total, refs)
    if cfg.clip is not None:
        total = total.clamp(cfg.clip[0], cfg.clip[1])
    return total
