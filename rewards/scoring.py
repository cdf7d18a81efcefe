"""Scoring a `RolloutBatch`: every reward term, its fallback on failure, the weighted total, shaping.

    total[i] = shape( sum_k weight_k * value_k[i] )

`value_k[i]` is reward k's total for sample i; a reward that returned None ("does not apply") contributes
0 to the sum and is NaN in `components[label]`, so it is left out of that reward's logged mean. A failed
call (raise, timeout, NaN/inf, wrong type) follows the reward's `on_error`: `zero` scores 0 (also in the
component), `drop_group` scores 0 and marks the sample's whole group
`keep=False`, `fail` raises a UserError naming the reward and the cause. Failures are counted per reward
in `RewardResult.errors` and each distinct cause is logged once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from rewards.calling import Outcome, call_reward, call_service
from rewards.isolation import IsolatedReward
from rewards.loading import load_function
from rewards.shaping import shape
from rl.batch import RolloutBatch
from rl.config.rewards import RewardConfig
from rl.errors import UserError
from rl.registries import REWARD_MODELS
from rl.types import BatchReward, RewardResult

if TYPE_CHECKING:
    from rl.config.rewards import AnyRewardConfig, ServiceRewardConfig, ShapingConfig

Place = Callable[[Callable[..., BatchReward], "ServiceRewardConfig"], BatchReward]
"""How a placeable model-backed reward is started elsewhere (its own Ray actor, rl/loop/reward_actor.py)."""

log = logging.getLogger(__name__)


class RewardTerm:
    """One configured reward: how to call it, and what a failure gives."""

    def __init__(self, cfg: AnyRewardConfig, place: Place | None = None) -> None:
        self.cfg = cfg
        self.label = cfg.label
        self.isolated: IsolatedReward | None = None
        self.service: BatchReward | None = None
        if isinstance(cfg, RewardConfig):
            self.fn = load_function(cfg.name, cfg.import_path)  # fail fast in the trainer for a bad path/name
            isolate = cfg.isolate if cfg.isolate is not None else cfg.import_path is not None
            self.isolated = IsolatedReward(cfg.name, cfg.import_path, cfg.kwargs, cfg.timeout_s,
                                           batched=bool(getattr(self.fn, "batched", False)),
                                           memory_mb=cfg.memory_mb) if isolate else None
        else:
            factory = REWARD_MODELS.get(cfg.name)
            remote = place is not None and getattr(factory, "placeable", False)
            self.service = place(factory, cfg) if remote else factory(cfg)  # type: ignore[misc]  # checked above
        self._logged: set[str] = set()

    def outcomes(self, batch: RolloutBatch) -> list[Outcome]:
        fields = [dict(m) for m in batch.sample_meta]
        if self.service is not None:
            return call_service(self.service, batch.prompt_texts, batch.completion_texts, fields)
        if self.isolated is not None:
            return self.isolated(batch.prompt_texts, batch.completion_texts, fields)
        assert isinstance(self.cfg, RewardConfig), "a function reward"
        return call_reward(self.fn, batch.prompt_texts, batch.completion_texts, fields, self.cfg.kwargs)

    def failed(self, cause: str) -> None:
        if self.cfg.on_error == "fail":
            raise UserError(f"reward {self.label!r} failed: {cause}. Fix the function, or set on_error: zero "
                            "or drop_group to continue past failures.")
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning("reward %r failed (%s); the sample gets on_error=%s. Logged once per cause.",
                        self.label, cause, self.cfg.on_error)

    def values(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """([N] value: NaN where None, 0 where failed; {part: [N]}; [N] bool failed)."""
        n = batch.num_samples
        values = torch.full((n,), math.nan)
        failed = torch.zeros(n, dtype=torch.bool)
        parts: dict[str, torch.Tensor] = {}
        for i, outcome in enumerate(self.outcomes(batch)):
            if outcome[0] != "ok":  # indexing (not unpacking) keeps the ok/error pairing for the type checker
                self.failed(str(outcome[1]))
                failed[i] = True
                values[i] = 0.0
                continue
            total, sub = outcome[1]
            values[i] = math.nan if total is None else total
            for k, v in sub.items():
                parts.setdefault(k, torch.full((n,), math.nan))[i] = v
        return values, parts, failed

    def close(self) -> None:
        if self.isolated is not None:
            self.isolated.close()
        if self.service is not None:
            self.service.close()


class RewardScorer:
    """The `rl.types.Scorer` built from the job's `rewards:` and `shaping:` sections."""

    def __init__(self, terms: Sequence[RewardTerm], shaping: ShapingConfig) -> None:
        self.terms, self.shaping = list(terms), shaping

    def score(self, batch: RolloutBatch, shaped: bool = True) -> RewardResult:
        n = batch.num_samples
        total = torch.zeros(n)
        keep = torch.ones(n, dtype=torch.bool)
        components: dict[str, torch.Tensor] = {}
        errors: dict[str, int] = {}
        for term in self.terms:
            values, parts, failed = term.values(batch)
            components[term.label] = values
            components.update({f"{term.label}/{k}": v for k, v in parts.items()})
            total += term.cfg.weight * torch.nan_to_num(values, nan=0.0)
            errors[term.label] = int(failed.sum())
            if term.cfg.on_error == "drop_group" and bool(failed.any()):
                keep &= ~_whole_groups(batch.group_ids, failed)
        total = shape(total, batch, self.shaping) if shaped else total
        return RewardResult(total=total, components=components, keep=keep, errors=errors)

    def total_spec(self) -> list[tuple[str, float]]:
        """(label, weight) of each term: what the unshaped total is a sum of (PAR checks its references')."""
        return [(term.label, term.cfg.weight) for term in self.terms]

    def close(self) -> None:
        for term in self.terms:
            term.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _whole_groups(group_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.isin(group_ids, torch.unique(group_ids[rows]))


def build_scorer(reward_cfgs: Sequence[AnyRewardConfig], shaping: ShapingConfig,
                 place: Place | None = None) -> RewardScorer:
    """A scorer for `job.rewards` and `job.shaping`; `place` starts placeable reward models elsewhere (Ray).
    `close()` it."""
    terms: list[RewardTerm] = []
    try:
        for cfg in reward_cfgs:
            terms.append(RewardTerm(cfg, place))
    except BaseException:
        for term in terms:
            term.close()
        raise
    return RewardScorer(terms, shaping)
