"""Built-in rewards, registered by name (`rewards: [{name: math_answer}]`)."""

from __future__ import annotations

import re
import threading
from typing import Any

from rewards import RewardOutput
from rl.registries import REWARDS

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _math_verify_timeout(seconds: int) -> int | None:
    # math-verify's timeouts use SIGALRM, which only works on the main thread.
    return seconds if threading.current_thread() is threading.main_thread() else None


@REWARDS.register("math_answer")
def math_answer(prompt: str, completion: str, answer: Any = None, **fields: Any) -> float | None:
    """1.0 if the completion's answer is mathematically equivalent to `answer` (math-verify: boxed
    answers, fractions, LaTeX, plain numbers), else 0.0; None when the sample has no answer."""
    if answer is None:
        return None
    from math_verify import parse, verify

    timeout = _math_verify_timeout(5)
    gold = parse(str(answer) if "\\" in str(answer) or "$" in str(answer) else f"${answer}$", parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


@REWARDS.register("last_number")
def last_number(prompt: str, completion: str, answer: Any = None, **fields: Any) -> float | None:
    """1.0 if the last number in the completion equals `answer` numerically."""
    if answer is None:
        return None
    found = NUMBER.findall(completion.replace(",", ""))
    try:
        return 1.0 if found and float(found[-1]) == float(str(answer).replace(",", "")) else 0.0
    except ValueError:
        return 0.0


@REWARDS.register("format")
def format_reward(prompt: str, completion: str, pattern: str = r"(?s)<think>.*</think>\s*<answer>.*</answer>",
                  **fields: Any) -> float:
    """1.0 if the whole completion matches `pattern` (default: think/answer tags)."""
    return 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0


@REWARDS.register("length_penalty")
def length_penalty(prompt: str, completion: str, max_chars: int = 200, **fields: Any) -> float:
    """0 up to `max_chars`, then falls linearly to -1 at twice that length."""
    over = max(0, len(completion) - max_chars)
    return -min(1.0, over / max_chars)


REASONING_PHRASES = ("first", "then", "next", "therefore", "so ", "because", "let's", "step", "check", "verify",
                     "wait", "alternatively", "finally")


@REWARDS.register("reasoning_pattern")
def reasoning_pattern(prompt: str, completion: str, phrases: tuple[str, ...] = REASONING_PHRASES,
                      per_phrase: float = 0.1, cap: float = 1.0, **fields: Any) -> RewardOutput:
    """Reasoning Pattern Reward (arXiv 2505.22653): reward key reasoning phrases, each counted once, capped."""
    text = completion.lower()
    hits = sum(1 for p in phrases if p in text)
    return RewardOutput(total=min(cap, per_phrase * hits), components={"phrases": float(hits)})


@REWARDS.register("digit_fraction")
def digit_fraction(prompt: str, completion: str, **fields: Any) -> float | None:
    """Fraction of the completion's non-space characters that are digits or '-': a dense shaping signal
    toward numeric answers (and the learning signal of the `tiny` smoke job, whose random model never
    gets an answer right)."""
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isdigit() or c == "-" for c in chars) / len(chars)
