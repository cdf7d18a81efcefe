"""Small `verifiers` environments for the tests, written with verifiers' own classes (as an env package would):
`load_environment(kind="single" | "multi" | "tool", size=8)`.

- single: vf.SingleTurnEnv over "Repeat the number N." questions; rubric: exact answer (weight 1) + a length
  score (weight 0.5), so the random tiny model's episodes still get different rewards.
- multi: a vf.MultiTurnEnv of 3 model turns; after each turn the env says "go on <turn>".
- faulty: multi, except that example 0 hangs, 1 raises, 2 blocks the event loop (containment tests).
- tool: vf.ToolEnv with a `add(a, b)` tool (function calling through the endpoint's `tools`).
"""

from __future__ import annotations

import asyncio
import time

import verifiers as vf
from datasets import Dataset


def _dataset(size: int) -> Dataset:
    return Dataset.from_list([{"question": f"Repeat the number {i}.", "answer": str(i)} for i in range(size)])


def _text(completion) -> str:
    return " ".join(str(m.get("content") or "") for m in completion if m.get("role") == "assistant")


def exact(completion, answer, **kwargs) -> float:
    return 1.0 if _text(completion).strip() == str(answer) else 0.0


def brevity(completion, **kwargs) -> float:
    return 1.0 / (1.0 + len(_text(completion)))


def _rubric() -> vf.Rubric:
    return vf.Rubric(funcs=[exact, brevity], weights=[1.0, 0.5])


class GoOn(vf.MultiTurnEnv):
    async def env_response(self, messages, state, **kwargs):
        return [{"role": "user", "content": f"go on {len(state['trajectory']) - 1}"}]


class Faulty(GoOn):
    """GoOn, except after the first turn: example 0 hangs (async), 1 raises, 2 blocks the event loop (a sync call
    that hangs, as a sync tool would); the others go on."""

    async def env_response(self, messages, state, **kwargs):
        example = state["example_id"]
        if example == 0:
            await asyncio.sleep(60)
        if example == 1:
            raise RuntimeError("the environment broke")
        if example == 2:
            time.sleep(30)
        return await super().env_response(messages, state, **kwargs)


def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return str(a + b)


def load_environment(kind: str = "single", size: int = 8, **kwargs) -> vf.Environment:
    if kind == "single":
        return vf.SingleTurnEnv(dataset=_dataset(size), rubric=_rubric(), **kwargs)
    if kind == "multi":
        return GoOn(dataset=_dataset(size), rubric=_rubric(), max_turns=3, **kwargs)
    if kind == "faulty":
        return Faulty(dataset=_dataset(size), rubric=_rubric(), max_turns=3, **kwargs)
    if kind == "tool":
        return vf.ToolEnv(dataset=_dataset(size), tools=[add], rubric=_rubric(), max_turns=3, **kwargs)
    raise ValueError(f"unknown kind {kind!r}")
