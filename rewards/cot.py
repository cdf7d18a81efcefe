"""Rewards for chain-of-thought answers that follow a delimiter (GRPO-MA's thought/answer split)."""

from __future__ import annotations

import re

from rl.registries import REWARDS

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@REWARDS.register("answer_after")
def answer_after(prompt: str, completion: str, answer: object = None, delimiter: str = "The answer is",
                 final_turn: str | None = None, **fields: object) -> float | None:
    """1.0 if the first number after the first `delimiter` equals `answer` numerically, else 0.0 (also 0.0
    without the delimiter, as GRPO-MA scores a thought that never reaches it); None without an answer. In a
    multi-turn episode only the model's last turn (`final_turn`) counts.

    Scoring only what follows the delimiter gives GRPO and GRPO-MA the same task: numbers inside the
    reasoning never count, and a response without the delimiter earns nothing in either method.
    """
    if answer is None:
        return None
    completion = completion if final_turn is None else final_turn
    _, sep, tail = completion.partition(delimiter)
    found = NUMBER.search(tail.replace(",", "")) if sep else None
    try:
        return 1.0 if found and float(found.group()) == float(str(answer).replace(",", "")) else 0.0
    except ValueError:  # a non-numeric gold answer never matches
        return 0.0
