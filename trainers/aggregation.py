"""Aggregating a per-token loss matrix into a scalar (ALGORITHMS.md §1.3), kept apart from the objective.

Pure functions `fn(loss [B, T], mask [B, T], norm: Normalisers, cfg) -> scalar`. Every function divides
by *global* normalisers of the whole mini-batch (`Normalisers`, counted once before the micro-batches),
never by the micro-batch's own counts, so the sum of the micro-batches' results equals the result on
the whole mini-batch: gradient accumulation is exact, whatever the micro-batch split.

Worked example (ALGORITHMS.md §1.6 test 5): lengths 1 and 3, token losses [1] and [1, 2, 3]:
    token_mean = 7/4 = 1.75;  seq_mean_token_mean = (1 + 2)/2 = 1.5;  seq_mean_token_sum = (1 + 6)/2 = 3.5;
    constant (C = 4) = 7/(2*4) = 0.875
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rl.registries import AGGREGATIONS

if TYPE_CHECKING:
    from rl.config.algorithm import ConstantNorm, SeqMeanTokenMean, SeqMeanTokenSum, TokenMean


@dataclass(frozen=True)
class Normalisers:
    """Counts over the whole mini-batch: loss tokens, sequences, and the Dr.GRPO constant length."""

    tokens: float
    sequences: float
    constant_length: float

    @staticmethod
    def of(mask: torch.Tensor, constant_length: float) -> Normalisers:
        """Counts of a whole mini-batch's `mask [B, T]` (B rows, each one sequence)."""
        return Normalisers(tokens=float(mask.sum()), sequences=float(mask.shape[0]),
                           constant_length=float(constant_length))


@AGGREGATIONS.register("token_mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, norm: Normalisers, cfg: TokenMean) -> torch.Tensor:
    """sum_{i,t} m L / sum_{i,t} m  (DAPO, arXiv 2503.14476; verl's default)."""
    return (loss * mask).sum() / max(norm.tokens, 1.0)  # loss, mask: [B, T]


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, norm: Normalisers,
                        cfg: SeqMeanTokenMean) -> torch.Tensor:
    """(1/B) sum_i (1/|y_i|) sum_t m L  (the original GRPO objective; GSPO)."""
    per_seq = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
    return per_seq.sum() / max(norm.sequences, 1.0)


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor, norm: Normalisers,
                       cfg: SeqMeanTokenSum) -> torch.Tensor:
    """(1/B) sum_i sum_t m L."""
    return (loss * mask).sum() / max(norm.sequences, 1.0)


@AGGREGATIONS.register("constant")
def constant(loss: torch.Tensor, mask: torch.Tensor, norm: Normalisers, cfg: ConstantNorm) -> torch.Tensor:
    """sum_{i,t} m L / (B * C) with a constant C (Dr.GRPO, arXiv 2503.20783): no length bias."""
    return (loss * mask).sum() / max(norm.sequences * norm.constant_length, 1.0)
