"""Reward functions: the plug-in contract.

A reward is a plain callable `fn(prompt, completion, **fields) -> float | RewardOutput | Mapping | None`:
`fields` are the sample's dataset columns (e.g. `answer`); `None` means "does not apply" (excluded
from that reward's mean, contributes 0 to the total). A mapping is `{"total": float, "components":
{name: float}}`. Mark a function that scores whole lists at once with `@batched_reward`; `async def`
functions are awaited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, TypeVar

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class RewardOutput:
    total: float
    components: Mapping[str, float] = field(default_factory=dict)


def batched_reward(fn: F) -> F:
    """Declare that `fn(prompts, completions, **fields_as_lists)` returns one value per sample."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn
