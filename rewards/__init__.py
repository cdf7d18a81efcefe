"""Reward functions: the plug-in contract.

A reward is a plain callable `fn(prompt, completion, **fields) -> float | RewardOutput | Mapping | None`:
`fields` are the sample's dataset columns/metadata (e.g. `answer`) plus the reward's configured `kwargs`
(which win on a name clash); a function without `**fields` gets only the fields it names. `None` means
"does not apply": the sample is left out of that reward's mean and contributes 0 to the weighted total.
A mapping is `{"total": float, "components": {name: float}}`. Mark a function that scores whole lists at
once with `@batched_reward` (`fn(prompts, completions, **fields_as_lists) -> list`); `async def` functions
(batched or not) are awaited, the per-sample ones of a batch concurrently.

    from rewards import RewardOutput

    def brevity(prompt, completion, answer=None, **fields):
        words = len(completion.split())
        return RewardOutput(total=-words / 100, components={"words": words})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import TypeVar

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class RewardOutput:
    """A reward's total and its named parts (each part is logged as `reward/<label>/<part>/mean`)."""

    total: float
    components: Mapping[str, float] = field(default_factory=dict)


class RewardError(ValueError):
    """A reward returned something unusable (NaN, inf, wrong type)."""


def batched_reward(fn: F) -> F:
    """Declare that `fn(prompts, completions, **fields_as_lists)` returns one value per sample."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn


def normalise(value: object) -> tuple[float | None, dict[str, float]]:
    """(total or None, components) from any accepted return value; RewardError otherwise."""
    if value is None:
        return None, {}
    total: float | Real
    if isinstance(value, RewardOutput):
        total, parts = value.total, dict(value.components)
    elif isinstance(value, Mapping) and "total" in value:
        total, parts = value["total"], dict(value.get("components") or {})
    elif isinstance(value, Real):  # bools too: `return completion == answer` is a natural reward
        total, parts = value, {}
    else:
        raise RewardError(f"returned {type(value).__name__}; expected a number, None, RewardOutput or "
                          "{'total': ..., 'components': {...}}")
    values = [total, *parts.values()]
    if not all(isinstance(v, Real) and math.isfinite(float(v)) for v in values):
        raise RewardError(f"returned a non-finite or non-numeric value (total={total!r}, components={parts!r})")
    return float(total), {str(k): float(v) for k, v in parts.items()}
