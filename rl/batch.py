"""`RolloutBatch`: the one data structure between rollout and learner.

N = prompts x group size (groups are contiguous rows), T = longest prompt+completion.
Every row is `[prompt tokens][completion tokens][right padding]`:

    input_ids       [N, T] long   prompt + completion token ids, right-padded with pad_token_id
    attention_mask  [N, T] bool   True on real (prompt or completion) tokens
    loss_mask       [N, T] bool   True only on sampled, trainable completion tokens
                                  (environment/tool tokens inside a completion are False)
    sampling_logprobs [N, T] f32  logprob of each sampled token under the engine that sampled it,
                                  at the position of the token itself (0 where loss_mask is False)
    prompt_lengths  [N] long      number of prompt tokens (the shared prefix of a group)
    group_ids       [N] long      the group of each row; rows of one group are contiguous
    policy_version  int           weights version that sampled the batch
    finish_reasons  N strings     "stop" (EOS or stop string), "length", "abort"
    prompt_texts / completion_texts  N strings, decoded once by the rollout side (for rewards, SAPO)
    sample_meta     N mappings    env fields for rewards (answer, ...), read-only

Filled later by the driver (each `with_*` returns a new batch; the batch is frozen):
    rewards [N] f32, reward_components {name: [N] f32}, advantages [N] or [N, T] f32,
    ref_logprobs [N, T] f32.

Logprob convention: `sampling_logprobs[i, t]` is log p(input_ids[i, t] | input_ids[i, :t]), i.e. the
values are aligned with the tokens they score, so `loss_mask` selects both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

FINISH_REASONS = ("stop", "length", "abort")


def _frozen_meta(meta: Sequence[Mapping[str, object]]) -> tuple[Mapping[str, object], ...]:
    return tuple(MappingProxyType(dict(m)) for m in meta)


@dataclass(frozen=True)
class RolloutBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    prompt_lengths: torch.Tensor
    group_ids: torch.Tensor
    policy_version: int
    finish_reasons: tuple[str, ...]
    prompt_texts: tuple[str, ...]
    completion_texts: tuple[str, ...]
    sample_meta: tuple[Mapping[str, object], ...]
    rewards: torch.Tensor | None = None
    reward_components: Mapping[str, torch.Tensor] = field(default_factory=dict)
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Normalise container types so equality and immutability hold whatever the caller passed.
        object.__setattr__(self, "finish_reasons", tuple(self.finish_reasons))
        object.__setattr__(self, "prompt_texts", tuple(self.prompt_texts))
        object.__setattr__(self, "completion_texts", tuple(self.completion_texts))
        object.__setattr__(self, "sample_meta", _frozen_meta(self.sample_meta))
        object.__setattr__(self, "reward_components", MappingProxyType(dict(self.reward_components)))

    # ----- shape helpers -------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[N] number of trainable completion tokens per row."""
        return self.loss_mask.sum(dim=1)

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """[N] prompt + completion tokens per row."""
        return self.attention_mask.sum(dim=1)

    def group_bounds(self) -> list[tuple[int, int]]:
        """[(start, end)] row ranges of each group, in order."""
        ids = self.group_ids.tolist()
        bounds, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                bounds.append((start, i))
                start = i
        return bounds

    @property
    def num_groups(self) -> int:
        return len(self.group_bounds())

    # ----- validation ----------------------------------------------------------------------
    def validate(self) -> RolloutBatch:
        """Check every invariant of the contract; raise ValueError naming the broken one."""
        n, t = self.input_ids.shape if self.input_ids.dim() == 2 else (-1, -1)
        _check(self.input_ids.dim() == 2 and self.input_ids.dtype == torch.long, "input_ids must be [N, T] long")
        for name in ("attention_mask", "loss_mask"):
            v = getattr(self, name)
            _check(v.shape == (n, t) and v.dtype == torch.bool, f"{name} must be [N, T] bool")
        _check(self.sampling_logprobs.shape == (n, t) and self.sampling_logprobs.is_floating_point(),
               "sampling_logprobs must be [N, T] float")
        for name in ("prompt_lengths", "group_ids"):
            v = getattr(self, name)
            _check(v.shape == (n,) and v.dtype == torch.long, f"{name} must be [N] long")
        for name in ("finish_reasons", "prompt_texts", "completion_texts", "sample_meta"):
            _check(len(getattr(self, name)) == n, f"{name} must have N={n} entries")
        _check(all(r in FINISH_REASONS for r in self.finish_reasons), f"finish_reasons must be in {FINISH_REASONS}")
        _check(not bool((self.loss_mask & ~self.attention_mask).any()), "loss_mask must lie inside attention_mask")
        positions = torch.arange(t).unsqueeze(0)
        _check(not bool((self.loss_mask & (positions < self.prompt_lengths.unsqueeze(1))).any()),
               "loss_mask must be False on prompt tokens")
        lengths = self.attention_mask.sum(1, keepdim=True)
        _check(bool((self.attention_mask == (positions < lengths)).all()), "rows must be right-padded")
        _check(bool(torch.isfinite(self.sampling_logprobs[self.loss_mask]).all()), "sampling_logprobs must be finite")
        _check(len(set(self.group_ids.tolist())) == self.num_groups, "rows of a group must be contiguous")
        self._validate_filled(n, t)
        return self

    def _validate_filled(self, n: int, t: int) -> None:
        if self.rewards is not None:
            _check(self.rewards.shape == (n,), "rewards must be [N]")
        for name, v in self.reward_components.items():
            _check(v.shape == (n,), f"reward_components[{name!r}] must be [N]")
        if self.advantages is not None:
            _check(self.advantages.shape in ((n,), (n, t)), "advantages must be [N] or [N, T]")
        if self.ref_logprobs is not None:
            _check(self.ref_logprobs.shape == (n, t), "ref_logprobs must be [N, T]")

    # ----- functional updates --------------------------------------------------------------
    def replace(self, **changes: Any) -> RolloutBatch:  # any of the fields, each its own type
        return dataclasses.replace(self, **changes)

    def with_rewards(self, rewards: torch.Tensor,
                     components: Mapping[str, torch.Tensor] | None = None) -> RolloutBatch:
        return self.replace(rewards=rewards.float(), reward_components=dict(components or {}))

    def with_advantages(self, advantages: torch.Tensor) -> RolloutBatch:
        return self.replace(advantages=advantages.float())

    def with_ref_logprobs(self, ref_logprobs: torch.Tensor) -> RolloutBatch:
        return self.replace(ref_logprobs=ref_logprobs.float())

    # ----- selection, sharding, concatenation ----------------------------------------------
    def select(self, rows: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """The given rows (in order), trimmed to the longest remaining sequence."""
        idx = torch.as_tensor(list(rows) if not isinstance(rows, torch.Tensor) else rows, dtype=torch.long)
        keep = [int(i) for i in idx]
        width = int(self.attention_mask[idx].sum(1).max()) if len(keep) else 0

        def take(v: torch.Tensor) -> torch.Tensor:
            return v[idx][:, :width] if v.dim() == 2 else v[idx]

        def take_set(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else take(v)

        return RolloutBatch(
            input_ids=take(self.input_ids), attention_mask=take(self.attention_mask),
            loss_mask=take(self.loss_mask), sampling_logprobs=take(self.sampling_logprobs),
            prompt_lengths=take(self.prompt_lengths), group_ids=take(self.group_ids),
            policy_version=self.policy_version,
            finish_reasons=tuple(self.finish_reasons[i] for i in keep),
            prompt_texts=tuple(self.prompt_texts[i] for i in keep),
            completion_texts=tuple(self.completion_texts[i] for i in keep),
            sample_meta=tuple(self.sample_meta[i] for i in keep),
            rewards=take_set(self.rewards),
            reward_components={k: take(v) for k, v in self.reward_components.items()},
            advantages=take_set(self.advantages), ref_logprobs=take_set(self.ref_logprobs),
        )

    def split_by_groups(self, k: int) -> list[RolloutBatch]:
        """Split into at most `k` shards of whole groups, as even in group count as possible."""
        if k < 1:
            raise ValueError("split_by_groups needs k >= 1")
        bounds = self.group_bounds()
        per, extra = divmod(len(bounds), k)
        shards, g = [], 0
        for s in range(k):
            count = per + (1 if s < extra else 0)
            if count == 0:
                continue
            rows = range(bounds[g][0], bounds[g + count - 1][1])
            shards.append(self.select(list(rows)))
            g += count
        return shards

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_token_id: int = 0) -> RolloutBatch:
        """Stack batches row-wise (padding to the widest); group ids are renumbered to stay distinct.

        The result's `policy_version` is the oldest one (the conservative choice for staleness).
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        width = max(b.seq_len for b in batches)
        group_ids, offset = [], 0
        for b in batches:
            _, inverse = torch.unique_consecutive(b.group_ids, return_inverse=True)
            group_ids.append(inverse + offset)
            offset += int(inverse.max()) + 1 if len(inverse) else 0
        cat2 = lambda name, fill: torch.cat([_pad_to(getattr(b, name), width, fill) for b in batches])  # noqa: E731
        filled = lambda name: None if any(getattr(b, name) is None for b in batches) else cat_any(name)  # noqa: E731

        def cat_any(name: str) -> torch.Tensor:
            vals = [getattr(b, name) for b in batches]
            if vals[0].dim() == 2:
                return torch.cat([_pad_to(v, width, 0.0) for v in vals])
            return torch.cat(vals)

        names = set(batches[0].reward_components)
        components = {}
        if all(set(b.reward_components) == names for b in batches):
            components = {k: torch.cat([b.reward_components[k] for b in batches]) for k in names}
        return RolloutBatch(
            input_ids=cat2("input_ids", pad_token_id), attention_mask=cat2("attention_mask", False),
            loss_mask=cat2("loss_mask", False), sampling_logprobs=cat2("sampling_logprobs", 0.0),
            prompt_lengths=torch.cat([b.prompt_lengths for b in batches]), group_ids=torch.cat(group_ids),
            policy_version=min(b.policy_version for b in batches),
            finish_reasons=sum((b.finish_reasons for b in batches), ()),
            prompt_texts=sum((b.prompt_texts for b in batches), ()),
            completion_texts=sum((b.completion_texts for b in batches), ()),
            sample_meta=sum((b.sample_meta for b in batches), ()),
            rewards=filled("rewards"), reward_components=components,
            advantages=filled("advantages"), ref_logprobs=filled("ref_logprobs"),
        )


def _pad_to(v: torch.Tensor, width: int, fill: float | bool) -> torch.Tensor:
    if v.shape[1] == width:
        return v
    pad = torch.full((v.shape[0], width - v.shape[1]), fill, dtype=v.dtype)
    return torch.cat([v, pad], dim=1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid RolloutBatch: {message}")
