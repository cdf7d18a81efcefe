"""`arithmetic`: integer questions `a op b`, generated deterministically from the job seed.

Train and test questions are disjoint (a question is in the test split iff it was drawn there
first), so held-out accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from envs.base import render_prompt, stable_id
from rl.registries import ENVS
from rl.types import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.data import ArithmeticEnv as ArithmeticConfig

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
    out: list[tuple[int, str, int]] = []
    while len(out) < count:
        q = (rng.randint(low, high), rng.choice(list(operations)), rng.randint(low, high))
        if q not in seen and q not in exclude:
            seen.add(q)
            out.append(q)
    return out


def digit_shares(digits: int | Sequence[int]) -> list[tuple[int, Callable[[int], int]]]:
    """(digits, share of a split size) per difficulty: an int is the whole split (the single-difficulty
    env, drawn exactly as before); a list splits each size evenly, the first ones taking the remainder."""
    if isinstance(digits, int):
        return [(digits, lambda n: n)]
    kinds = list(dict.fromkeys(digits))
    return [(d, partial(_share, i, len(kinds))) for i, d in enumerate(kinds)]


def _share(i: int, kinds: int, n: int) -> int:
    """Difficulty i's part of n prompts split over `kinds` difficulties (the first ones take the remainder)."""
    return n // kinds + (i < n % kinds)


@ENVS.register("arithmetic")
class ArithmeticEnv:
    def __init__(self, cfg: ArithmeticConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        test, train = [], []
        for digits, share in digit_shares(cfg.digits):
            rng = random.Random(f"arithmetic:{seed}:{digits}:{''.join(cfg.operations)}")
            test += draw_questions(digits, cfg.operations, share(cfg.test_size), rng, set())
            train += draw_questions(digits, cfg.operations, share(cfg.train_size), rng, set(test))
        if not isinstance(cfg.digits, int):  # mixed: interleave difficulties (the sampler permutes anyway)
            random.Random(f"arithmetic-mix:{seed}").shuffle(train)
            random.Random(f"arithmetic-mix:{seed}:test").shuffle(test)
        system = cfg.system_prompt or DEFAULT_SYSTEM
        self._train = [self._prompt(q, tokenizer, system) for q in train]
        self._test = [self._prompt(q, tokenizer, system) for q in test]

    @staticmethod
    def _prompt(q: tuple[int, str, int], tokenizer: PreTrainedTokenizerBase, system: str | None) -> Prompt:
        a, op, b = q
        return render_prompt(tokenizer, QUESTION.format(a=a, op=op, b=b), system, stable_id("arith", a, op, b),
                             {"answer": str(OPS[op](a, b))})

    def train_prompts(self) -> Sequence[Prompt]:
        return self._train

    def test_prompts(self) -> Sequence[Prompt]:
        return self._test
