"""Scoring a `RolloutBatch`: every reward term, its fallback on failure, the weighted total, shaping."""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any, Mapping, Sequence

import torch

from rewards import RewardOutput
from rewards.isolation import IsolatedReward, call_reward
from rewards.loading import load_function
from rewards.shaping import shape
from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.types import RewardResult

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """A reward returned something unusable (NaN, inf, wrong type)."""


def normalise(value: Any) -> tuple[float | None, dict[str, float]]:
    """(total or None, components) from any accepted return value; RewardError otherwise."""
    if value is None:
        return None, {}
    if isinstance(value, RewardOutput):
        total, parts = value.total, dict(value.components)
    elif isinstance(value, Mapping) and "total" in value:
        total, parts = value["total"], dict(value.get("components") or {})
    elif isinstance(value, Real):
        total, parts = value, {}
    else:
        raise RewardError(f"returned {type(value).__name__}; expected a number, None, RewardOutput or "
                          "{'total': ..., 'components': {...}}")
    values = [total, *parts.values()]
    if not all(isinstance(v, Real) and math.isfinite(float(v)) for v in values):
        raise RewardError(f"returned a non-finite or non-numeric value ({total!r}, {parts!r})")
    return float(total), {k: float(v) for k, v in parts.items()}


class RewardTerm:
    """One configured reward: how to call it, and what a failure gives."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.label = cfg.label
        isolate = cfg.isolate if cfg.isolate is not None else cfg.import_path is not None
        self.fn = load_function(cfg.name, cfg.import_path)  # fail fast in the parent for a bad path/name
        self.isolated = IsolatedReward(cfg.name, cfg.import_path, cfg.kwargs, cfg.timeout_s) if isolate else None
        self._logged: set[str] = set()
        self.errors = 0

    def raw(self, batch: RolloutBatch) -> list[tuple[str, Any]]:
        fields = [dict(m) for m in batch.sample_meta]
        if self.isolated is not None:
            return [self.isolated(p, c, f) for p, c, f in zip(batch.prompt_texts, batch.completion_texts, fields)]
        try:
            return [("ok", v) for v in call_reward(self.fn, batch.prompt_texts, batch.completion_texts, fields,
                                                   self.cfg.kwargs)]
        except Exception as exc:  # noqa: BLE001 - a failing reward must not stop training (on_error decides)
            return [("error", f"{type(exc).__name__}: {exc}")] * batch.num_samples

    def failed(self, cause: str) -> None:
        self.errors += 1
        if self.cfg.on_error == "fail":
            raise UserError(f"reward {self.label!r} failed: {cause}. Fix the function, or set on_error: zero "
                            "or drop_group to continue past failures.")
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning("reward %r failed (%s); the sample gets on_error=%s. Logged once per cause.",
                        self.label, cause, self.cfg.on_error)

    def close(self) -> None:
        if self.isolated is not None:
            self.isolated.close()


class Scorer:
    def __init__(self, terms: Sequence[RewardTerm], shaping: Any) -> None:
        self.terms, self.shaping = list(terms), shaping

    def score(self, batch: RolloutBatch) -> RewardResult:
        n = batch.num_samples
        total = torch.zeros(n)
        keep = torch.ones(n, dtype=torch.bool)
        components: dict[str, torch.Tensor] = {}
        errors: dict[str, int] = {}
        for term in self.terms:
            values, parts, failed = self._term_values(term, batch)
            components[term.label] = values
            components.update({f"{term.label}/{k}": v for k, v in parts.items()})
            total += term.cfg.weight * torch.nan_to_num(values, nan=0.0)
            errors[term.label] = int(failed.sum())
            if term.cfg.on_error == "drop_group" and bool(failed.any()):
                keep &= ~_whole_groups(batch.group_ids, failed)
        return RewardResult(total=shape(total, batch, self.shaping), components=components, keep=keep, errors=errors)

    def _term_values(self, term: RewardTerm, batch: RolloutBatch):
        n = batch.num_samples
        values = torch.full((n,), math.nan)
        failed = torch.zeros(n, dtype=torch.bool)
        parts: dict[str, torch.Tensor] = {}
        for i, (status, raw) in enumerate(term.raw(batch)):
            try:
                if status != "ok":
                    raise RewardError(raw)
                value, sub = normalise(raw)
            except RewardError as exc:
                term.failed(str(exc))
                failed[i] = True
                values[i] = 0.0
                continue
            values[i] = math.nan if value is None else value
            for k, v in sub.items():
                parts.setdefault(k, torch.full((n,), math.nan))[i] = v
        return values, parts, failed

    def close(self) -> None:
        for term in self.terms:
            term.close()


def _whole_groups(group_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    bad = torch.unique(group_ids[rows])
    return torch.isin(group_ids, bad)


def build_scorer(reward_cfgs: Sequence[Any], shaping: Any) -> Scorer:
    return Scorer([RewardTerm(c) for c in reward_cfgs], shaping)
