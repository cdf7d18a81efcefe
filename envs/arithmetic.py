"""`arithmetic`: integer questions `a op b`, generated deterministically from the job seed.

Train and test questions are disjoint (a question is in the test split iff it was drawn there
first), so held-out accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from envs.base import render_prompt, stable_id
from rl.registries import ENVS
from rl.types import Prompt

DEFAULT_SYSTEM = None
QUESTION = "What is {a} {op} {b}? Answer with just the number."
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def draw_questions(digits: int, operations: Sequence[str], count: int, rng: random.Random,
                   exclude: set[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    """`count` distinct (a, op, b) triples not in `exclude` (the space may be smaller: then all of it)."""
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    space = (high - low + 1) ** 2 * len(operations)
    count = min(count, space - len(exclude))
    seen: set[tuple[int, str, int]] = set()
    out = []
    while len(out) < count:
        q = (rng.randint(low, high), rng.choice(list(operations)), rng.randint(low, high))
        if q not in seen and q not in exclude:
            seen.add(q)
            out.append(q)
    return out


@ENVS.register("arithmetic")
class ArithmeticEnv:
    def __init__(self, cfg: Any, tokenizer: Any, seed: int) -> None:
        rng = random.Random(f"arithmetic:{seed}:{cfg.digits}:{''.join(cfg.operations)}")
        test = draw_questions(cfg.digits, cfg.operations, cfg.test_size, rng, set())
        train = draw_questions(cfg.digits, cfg.operations, cfg.train_size, rng, set(test))
        system = cfg.system_prompt or DEFAULT_SYSTEM
        self._train = [self._prompt(q, tokenizer, system) for q in train]
        self._test = [self._prompt(q, tokenizer, system) for q in test]

    @staticmethod
    def _prompt(q: tuple[int, str, int], tokenizer: Any, system: str | None) -> Prompt:
        a, op, b = q
        return render_prompt(tokenizer, QUESTION.format(a=a, op=op, b=b), system, stable_id("arith", a, op, b),
                             {"answer": str(OPS[op](a, b))})

    def train_prompts(self) -> Sequence[Prompt]:
        return self._train

    def test_prompts(self) -> Sequence[Prompt]:
        return self._test
