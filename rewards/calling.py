"""Calling a reward function on a batch: plain, batched and async functions, one outcome per sample.

An outcome is `("ok", (total_or_None, components))` or `("error", cause)`. A failure of one sample never
hides the others' values (a batched function fails as a whole: it gave no per-sample values).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal, cast

from rewards import normalise
from rl.types import BatchReward

Scores = tuple[float | None, dict[str, float]]
"""(total or None when the reward does not apply, {component: value})."""
Outcome = tuple[Literal["ok"], Scores] | tuple[Literal["error"], str]
"""One sample's result: its scores, or the cause of the failure."""


def _field_filter(fn: Callable[..., object]) -> Callable[[Mapping[str, object]], dict[str, object]]:
    """Functions without `**fields` get only the fields they name, so an extra dataset column is not an error."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins/C callables without a signature: pass everything
        return dict
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return lambda fields: {k: v for k, v in fields.items() if k in names}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _settle(value: object) -> Outcome:
    if isinstance(value, Exception):
        return "error", _describe(value)
    try:
        return "ok", normalise(value)
    except ValueError as exc:
        return "error", str(exc)


def _call_batched(fn: Callable[..., object], prompts: Sequence[str], completions: Sequence[str],
                  fields: list[dict[str, object]]) -> list[Outcome]:
    n = len(prompts)
    columns = {k: [f.get(k) for f in fields] for k in dict.fromkeys(k for f in fields for k in f)}
    try:
        result = fn(list(prompts), list(completions), **columns)
        values = list(cast(Iterable[object], asyncio.run(_await(result)) if inspect.isawaitable(result) else result))
    except Exception as exc:  # noqa: BLE001 - user code: any failure becomes the on_error fallback
        return [("error", _describe(exc))] * n
    if len(values) != n:
        return [("error", f"batched reward returned {len(values)} values for {n} samples")] * n
    return [_settle(v) for v in values]


async def _await(value: Awaitable[object]) -> object:
    return await value


async def _gather(pending: dict[int, Awaitable[object]]) -> dict[int, object]:
    done = await asyncio.gather(*pending.values(), return_exceptions=True)
    return dict(zip(pending, done))


def call_reward(fn: Callable[..., object], prompts: Sequence[str], completions: Sequence[str],
                fields: Sequence[Mapping[str, object]], kwargs: Mapping[str, object]) -> list[Outcome]:
    """One outcome per sample; `kwargs` (the reward's configured settings) override same-named fields."""
    keep = _field_filter(fn)
    merged = [keep({**f, **kwargs}) for f in fields]
    if getattr(fn, "batched", False):
        return _call_batched(fn, prompts, completions, merged)
    values: list[object] = []
    pending: dict[int, Awaitable[object]] = {}
    for i, (p, c, f) in enumerate(zip(prompts, completions, merged)):
        try:
            value = fn(p, c, **f)
        except Exception as exc:  # noqa: BLE001 - user code: any failure becomes the on_error fallback
            value = exc
        if inspect.isawaitable(value):
            pending[i] = value
        values.append(value)
    if pending:  # async rewards (e.g. calls to a judge service) of one batch run concurrently
        for i, v in asyncio.run(_gather(pending)).items():
            values[i] = v
    return [_settle(v) for v in values]


def call_service(reward: BatchReward, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, object]]) -> list[Outcome]:
    """A model-backed reward's outcomes; a call that fails as a whole (its actor died, out of memory) fails
    every sample of the batch."""
    try:
        values: Sequence[object] = reward(prompts, completions, fields)
    except Exception as exc:  # noqa: BLE001 - a reward model or judge of any kind: its failure is the fallback's
        return [("error", _describe(exc))] * len(prompts)
    if len(values) != len(prompts):
        return [("error", f"returned {len(values)} scores for {len(prompts)} samples")] * len(prompts)
    return [_settle(v) for v in values]
