"""`countdown`: reach a target by combining the given numbers with + - * / (each number used once).

Every puzzle is generated with a solution: numbers are drawn, then a random expression tree over all of
them is built (division only when exact, intermediate values positive integers), and its value is the
target. Deterministic from the seed; train and test puzzles are disjoint. The `countdown` reward checks
an answer against `meta["numbers"]` and `meta["target"]`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from envs.base import render_prompt, stable_id
from rl.registries import ENVS
from rl.types import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.data import CountdownEnv as CountdownConfig

QUESTION = ("Using the numbers {numbers}, each exactly once, and the operations + - * /, write an expression "
            "that equals {target}. Put the expression in <answer></answer> tags, e.g. <answer>(1 + 2) * 3</answer>.")
MAX_TRIES_PER_PUZZLE = 50


def _combine(a: int, b: int, rng: random.Random) -> int:
    options = [a + b, a * b] + ([a - b] if a > b else []) + ([a // b] if b > 1 and a % b == 0 else [])
    return rng.choice(options)


def draw_puzzle(count: int, max_number: int, max_target: int, rng: random.Random) -> tuple[tuple[int, ...], int] | None:
    """(sorted numbers, target) with a solution, or None if this draw found no target in range."""
    numbers = [rng.randint(1, max_number) for _ in range(count)]
    for _ in range(MAX_TRIES_PER_PUZZLE):
        pool = list(numbers)
        while len(pool) > 1:  # merge two random entries until one value (the target) is left
            a, b = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
            pool.append(_combine(max(a, b), min(a, b), rng))
        if 0 < pool[0] <= max_target:
            return tuple(sorted(numbers)), pool[0]
    return None


def draw_puzzles(cfg: CountdownConfig, total: int, rng: random.Random) -> list[tuple[tuple[int, ...], int]]:
    """`total` distinct puzzles (fewer if the space runs out: bounded by a try budget)."""
    seen: dict[tuple[tuple[int, ...], int], None] = {}
    for _ in range(total * 20):
        if len(seen) == total:
            break
        puzzle = draw_puzzle(cfg.numbers, cfg.max_number, cfg.max_target, rng)
        if puzzle is not None:
            seen.setdefault(puzzle, None)
    return list(seen)


@ENVS.register("countdown")
class CountdownEnv:
    def __init__(self, cfg: CountdownConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        rng = random.Random(f"countdown:{seed}:{cfg.numbers}:{cfg.max_number}:{cfg.max_target}")
        puzzles = draw_puzzles(cfg, cfg.test_size + cfg.train_size, rng)
        # Distinct puzzles split by position: test first, so train and test are disjoint by construction.
        test, train = puzzles[:cfg.test_size], puzzles[cfg.test_size:]
        self._test = [self._prompt(p, tokenizer, cfg.system_prompt) for p in test]
        self._train = [self._prompt(p, tokenizer, cfg.system_prompt) for p in train]

    @staticmethod
    def _prompt(puzzle: tuple[tuple[int, ...], int], tokenizer: PreTrainedTokenizerBase,
                system: str | None) -> Prompt:
        numbers, target = puzzle
        user = QUESTION.format(numbers=", ".join(map(str, numbers)), target=target)
        return render_prompt(tokenizer, user, system, stable_id("countdown", numbers, target),
                             {"numbers": list(numbers), "target": target})

    def train_prompts(self) -> Sequence[Prompt]:
        return self._train

    def test_prompts(self) -> Sequence[Prompt]:
        return self._test
