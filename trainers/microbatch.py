"""Micro-batches packed by a token budget, and no-grad logprob passes over them.

Packing only decides which rows share a forward pass; with the global normalisers of
trainers/aggregation.py the accumulated gradient does not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rl.batch import RolloutBatch


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Row indices of each micro-batch. Rows go longest first (similar lengths share a batch, so little
    padding) and are packed while rows x longest length stays within `token_budget`; a row longer than
    the budget gets a micro-batch of its own.

    >>> pack_micro_batches([3, 8, 5, 2], token_budget=10)
    [[1], [2, 0], [3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    for row in order:
        if packs and (len(packs[-1]) + 1) * lengths[packs[-1][0]] <= token_budget:
            packs[-1].append(row)
        else:
            packs.append([row])
    return packs


def micro_batches(batch: RolloutBatch, token_budget: int,
                  keep_groups: bool = False) -> list[tuple[list[int], RolloutBatch]]:
    """(rows, sub-batch trimmed to its longest row) for each micro-batch of `batch`.

    keep_groups (trainer.shared_prefix): whole groups only, each counted at its packed length
    prompt + sum of completions (one packed row per group, trainers/prefix_grouper.py)."""
    if not keep_groups:
        packs = pack_micro_batches(batch.sequence_lengths.tolist(), token_budget)
        return [(rows, batch.select(rows)) for rows in packs]
    bounds = batch.group_bounds()
    lengths = batch.sequence_lengths.tolist()
    packed = [sum(lengths[s:e]) - (e - s - 1) * int(batch.prompt_lengths[s]) for s, e in bounds]
    packs = [[r for g in pack for r in range(*bounds[g])] for pack in pack_micro_batches(packed, token_budget)]
    return [(rows, batch.select(rows)) for rows in packs]


def no_grad_logprobs(compute: Callable[[RolloutBatch], torch.Tensor], batch: RolloutBatch,
                     token_budget: int, keep_groups: bool = False) -> torch.Tensor:
    """[N, T] CPU logprobs of `batch` from `compute(micro) -> [n, t]`, run micro-batch by micro-batch
    without grad, so a whole rollout batch never goes through the model at once."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)  # [N, T]
    with torch.no_grad():
        for rows, micro in micro_batches(batch, token_budget, keep_groups):
            out[torch.tensor(rows), : micro.seq_len] = compute(micro).float().cpu()
    return out


def pack_groups(group_ids: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Row indices of each micro-batch made of whole groups (contiguous rows of equal id): groups are
    added in order while rows x longest length stays within `token_budget`; a group over the budget
    gets a micro-batch of its own. For objectives whose per-row terms depend on the whole group.

    >>> pack_groups([0, 0, 1, 1, 2], [3, 5, 2, 2, 9], token_budget=12)
    [[0, 1], [2, 3], [4]]
    """
    groups: list[list[int]] = []
    for row, gid in enumerate(group_ids):
        if groups and group_ids[groups[-1][0]] == gid:
            groups[-1].append(row)
        else:
            groups.append([row])
    packs: list[list[int]] = []
    for rows in groups:
        merged = packs[-1] + rows if packs else rows
        if packs and len(merged) * max(lengths[r] for r in merged) <= token_budget:
            packs[-1] = merged
        else:
            packs.append(list(rows))
    return packs


def group_micro_batches(batch: RolloutBatch, token_budget: int) -> list[tuple[list[int], RolloutBatch]]:
    """Like `micro_batches`, but a group is never split across micro-batches."""
    packs = pack_groups(batch.group_ids.tolist(), batch.sequence_lengths.tolist(), token_budget)
    return [(rows, batch.select(rows)) for rows in packs]
