"""Reward shaping applied to the weighted total, in the official PAR shaper's order: clip, then PAR.

PAR (Preference As Reward, arXiv 2502.18770, `calculate_relative_sigmoid` in PorUna-byte/PAR):
    r_shaped = (1/M) * sum_{m<=M} sigmoid(k * (r - r_ref_m))
with the reference responses' rewards `r_ref_m` given per sample in `sample_meta["ref_rewards"]` (a
dataset column: M rewards of reference-policy responses, scored offline with the same reward). Bounded in
(0, 1) and centred on the references, which blunts reward hacking of reward models. Only the sample's
reward is clipped; references are used as given.

    par(torch.tensor([2.0]), [[1.0, 3.0]])  ->  tensor([0.5])   # (sigmoid(1) + sigmoid(-1)) / 2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError

if TYPE_CHECKING:
    from rl.config.rewards import ShapingConfig


def par(rewards: torch.Tensor, ref_rewards: Sequence[Sequence[float]], k: float = 1.0,
        max_refs: int | None = None) -> torch.Tensor:
    """[N] mean over each sample's first `max_refs` references of sigmoid(k * (r - r_ref))."""
    out = torch.empty_like(rewards)  # [N]
    for i, refs in enumerate(ref_rewards):
        ref = torch.as_tensor(list(refs)[:max_refs], dtype=rewards.dtype)  # [M]
        out[i] = torch.sigmoid(k * (rewards[i] - ref)).mean()
    return out


def shape(total: torch.Tensor, batch: RolloutBatch, cfg: ShapingConfig) -> torch.Tensor:
    """[N] shaped reward from the [N] weighted total."""
    if cfg.clip is not None:
        total = total.clamp(cfg.clip[0], cfg.clip[1])
    if cfg.par:
        refs = [m.get("ref_rewards") for m in batch.sample_meta]
        if any(not r for r in refs):
            raise UserError("shaping.par needs reference rewards: give each sample a non-empty `ref_rewards` "
                            "list (a dataset column), or turn shaping.par off.")
        # sample_meta values are untyped dataset fields; `par` reads each as a list of numbers (as_tensor checks)
        total = par(total, cast("list[Sequence[float]]", refs), k=cfg.par_k, max_refs=cfg.par_max_refs)
    return total
