"""Infinite Sampling (Wang et al., arXiv 2506.22950) for the transformers backend.

The paper's three parts [PAPER, abstract] and what is built here:
1. Micro sampling groups: a group of G samples is decoded at most g at a time, so KV memory grows
   with g, not G. g = `max_concurrent`, optionally capped by `memory_budget_mb` (`slots_for_budget`).
   Each prompt is prefilled once per group and its KV copied into the slots (rollout/slot_decode.py).
2. Continuous sampling: a finished sequence's slot is refilled at once with the next pending sample
   of the same or another group (rollout/slot_decode.py); no round waits for its longest member.
3. Length-aware scheduling: the paper predicts lengths from the first generated tokens and plans with
   an FPTAS grouping + SJF refill. Built here [INFERRED, simplified]:
   - `LengthPredictor`: a prompt-conditioned length predictor learned online from finished samples
     (ridge regression on hashed prompt-token features, plus an exact-prompt running mean). It does
     not look at generated tokens: samples that have not started have none, and refill decisions are
     only ever made for samples that have not started (no pre-emption).
   - `plan_lanes`: the global plan, one lane of samples per slot with balanced predicted work, by
     longest-processing-time-first list scheduling (makespan <= 4/3 OPT; Graham 1969), not an FPTAS.
   - `LaneScheduler`: run-time refill, shortest predicted job first within the freed slot's lane;
     an empty lane steals the shortest job of the lane with the most predicted work left.
   Predictions only change the order samples start in, never what is sampled.

Correctness invariant (ALGORITHMS.md 5.2): scheduling changes only when a sample is decoded. Every
sample draws from its own generator seeded per (request, sample index) exactly as the plain HF path,
and rows come back in group order, so the RolloutBatch is the same as without Infinite Sampling up to
fp32 rounding differences between batch shapes.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from rl.types import Prompt, SamplingParams
from rollout.engine import Sample
from rollout.slot_decode import DecodeStats, SlotDecoder, StopRule, TokenSampler, model_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from rl.config.rollout import InfiniteSamplingOptions


def slots_for_budget(model_config: PretrainedConfig, budget_mb: float, max_len: int, dtype_bytes: int) -> int:
    """Most concurrent sequences whose KV cache (max_len positions each) and fp32 logits fit budget_mb.

    Per slot: 2 (K and V) x layers x kv_heads x head_dim x dtype_bytes x max_len, plus about three
    [V] fp32 buffers for logits and sampling. Prompt states of open groups come on top (small: one
    prompt per open group, see DecodeStats.peak_open_prompts).
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_slot = 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes * max_len + 3 * cfg.vocab_size * 4
    return max(1, int(budget_mb * 2 ** 20 // per_slot))


class LengthPredictor:
    """Predicts a prompt's mean completion length from its token ids, learned online.

    Features x(prompt): [1, log(1 + prompt length), hashed token-unigram frequencies (`buckets` bins)].
    Weights: ridge regression w = (lambda I + sum x x^T)^-1 sum x y over every finished group seen so far,
    y = the group's mean completion length. A prompt seen before (same token ids) uses the running mean
    of its own observed lengths instead. Before any data it predicts `prior`.
    """

    def __init__(self, buckets: int = 64, ridge: float = 1.0) -> None:
        self.buckets = buckets
        dim = buckets + 2
        self.gram = ridge * torch.eye(dim, dtype=torch.float64)   # [D, D]
        self.moment = torch.zeros(dim, dtype=torch.float64)       # [D]
        self.seen: dict[str, tuple[float, int]] = {}              # prompt key -> (mean length, count)
        self.updates = 0

    def features(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.zeros(self.buckets + 2, dtype=torch.float64)
        x[0], x[1] = 1.0, math.log1p(len(ids))
        for t in ids:
            x[2 + (int(t) * 2654435761) % self.buckets] += 1.0 / len(ids)  # Knuth multiplicative hash
        return x

    def predict(self, ids: Sequence[int], prior: float) -> float:
        key = _key(ids)
        if key in self.seen:
            return self.seen[key][0]
        if self.updates == 0:
            return prior
        w = torch.linalg.solve(self.gram, self.moment)
        return float(w @ self.features(ids))

    def update(self, ids: Sequence[int], lengths: Sequence[int]) -> None:
        """Learn from one group's finished completion lengths."""
        y = sum(lengths) / len(lengths)
        x = self.features(ids)
        self.gram += torch.outer(x, x)
        self.moment += x * y
        mean, count = self.seen.get(_key(ids), (0.0, 0))
        self.seen[_key(ids)] = ((mean * count + y) / (count + 1), count + 1)
        self.updates += 1


def _key(ids: Sequence[int]) -> str:
    return hashlib.blake2b(",".join(map(str, ids)).encode(), digest_size=8).hexdigest()


def plan_lanes(predicted: Sequence[float], lanes: int) -> list[list[int]]:
    """Global plan: split samples 0..N-1 over `lanes` slots with balanced total predicted length.

    Longest-processing-time-first list scheduling: samples in decreasing predicted length each go to the
    least loaded lane (makespan <= (4/3 - 1/(3 lanes)) OPT). Each lane is then ordered shortest job first,
    ties by sample id, so all lanes walk through a group's samples together and few prompts stay open.
    """
    heap = [(0.0, lane) for lane in range(lanes)]
    plan: list[list[int]] = [[] for _ in range(lanes)]
    for i in sorted(range(len(predicted)), key=lambda i: (-predicted[i], i)):
        load, lane = heapq.heappop(heap)
        plan[lane].append(i)
        heapq.heappush(heap, (load + predicted[i], lane))
    return [sorted(lane, key=lambda i: (predicted[i], i)) for lane in plan]


class LaneScheduler:
    """Run-time refill: a freed row takes its lane's next (shortest predicted) sample; a row whose lane is
    empty steals the shortest sample of the lane with the most predicted work left."""

    def __init__(self, plan: list[list[int]], predicted: Sequence[float]) -> None:
        self.lanes = [deque(lane) for lane in plan]
        self.left = [sum(predicted[i] for i in lane) for lane in plan]
        self.predicted = predicted

    def __call__(self, row: int) -> int | None:
        lane = row % len(self.lanes)
        if not self.lanes[lane]:
            lane = max(range(len(self.lanes)), key=lambda k: (self.left[k], -k))
            if not self.lanes[lane]:
                return None
        i = self.lanes[lane].popleft()
        self.left[lane] -= self.predicted[i]
        return i

    def pending(self) -> bool:
        return any(self.lanes)


class FifoScheduler:
    """Refill in sample (prompt, then sample index) order: continuous sampling without length awareness."""

    def __init__(self, count: int) -> None:
        self.queue = deque(range(count))

    def __call__(self, row: int) -> int | None:
        return self.queue.popleft() if self.queue else None

    def pending(self) -> bool:
        return bool(self.queue)


class InfiniteSampler:
    """The HF engine's generation path when `rollout.infinite_sampling.enabled` (see the module docstring)."""

    def __init__(self, cfg: InfiniteSamplingOptions) -> None:
        self.cfg = cfg
        self.predictor = LengthPredictor()
        self.last_stats: DecodeStats | None = None
        self.last_slots = 0

    def slots(self, model: torch.nn.Module, prompts: Sequence[Prompt], params: SamplingParams) -> int:
        g = self.cfg.max_concurrent
        if self.cfg.memory_budget_mb is not None:
            max_len = max(len(p.token_ids) for p in prompts) + params.max_new_tokens
            dtype_bytes = next(model.parameters()).element_size()
            g = min(g, slots_for_budget(model_config(model), self.cfg.memory_budget_mb, max_len, dtype_bytes))
        return g

    def generate(self, model: torch.nn.Module, rows: list[tuple[int, Prompt, int]], params: SamplingParams,
                 sampler: TokenSampler, stopper: StopRule) -> list[Sample]:
        """rows: (group, prompt, seed) per sample in output order; returns one Sample per row, same order."""
        prompts = [p for _, p, _ in rows]
        groups = [g for g, _, _ in rows]
        slots = min(self.slots(model, prompts, params), len(rows))
        scheduler = self._scheduler(prompts, params, slots)
        decoder = SlotDecoder(model, [p.token_ids for p in prompts], groups, params.group_size, slots,
                              params.max_new_tokens)
        with torch.inference_mode():
            out = decoder.run(scheduler, sampler, stopper, scheduler.pending)
        self.last_stats, self.last_slots = decoder.stats, slots
        lengths = out.lengths.tolist()
        self._learn(rows, lengths)
        return [Sample(p, g, tuple(out.tokens[i, :n].tolist()), tuple(out.logprobs[i, :n].tolist()), out.reasons[i])
                for i, ((g, p, _), n) in enumerate(zip(rows, lengths))]

    def _scheduler(self, prompts: Sequence[Prompt], params: SamplingParams, slots: int
                   ) -> FifoScheduler | LaneScheduler:
        if self.cfg.order == "fifo":
            return FifoScheduler(len(prompts))
        cache: dict[tuple[int, ...], float] = {}
        predicted = [cache.setdefault(p.token_ids, self.predictor.predict(p.token_ids, params.max_new_tokens))
                     for p in prompts]
        predicted = [min(max(x, 1.0), params.max_new_tokens) for x in predicted]
        return LaneScheduler(plan_lanes(predicted, slots), predicted)

    def _learn(self, rows: list[tuple[int, Prompt, int]], lengths: list[int]) -> None:
        by_group: dict[int, list[int]] = {}
        for (g, _, _), n in zip(rows, lengths):
            by_group.setdefault(g, []).append(n)
        first = {g: p for g, p, _ in reversed(rows)}
        for g, group_lengths in by_group.items():
            self.predictor.update(first[g].token_ids, group_lengths)
