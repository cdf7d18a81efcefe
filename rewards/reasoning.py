"""`reasoning_pattern`: the Reasoning Pattern Reward (RPR) of arXiv 2505.22653 (ALGORITHMS.md §11.3).

Port of `think_reward` in trestad/Noisy-Rewards-in-Learning-to-Reason (verl `math_score.py`):

    score = max(0, min(1, count / 20) - ngram_repetition_ratio(n=20) - occurrences("user: "))

where `count` is how many key reasoning phrases occur at least once in the lower-cased response. It is
only awarded when a `\\boxed{}` answer can be extracted (else 0); correctness is not checked. The paper
finds that this alone trains math reasoning nearly as well as a correctness reward.
"""

from __future__ import annotations

from collections.abc import Sequence

from rewards import RewardOutput
from rl.registries import REWARDS

PHRASES = (
    "i need to", "we need to", "i should", "let me", "let's", "first, ", "next, ", "then, ", "finally, ",
    "wait", "alternatively", "let me check", "let me verify", "double-check", "check again", "verify",
    "therefore", "thus", "hence", "so the answer", "because", "since", "this means", "which means",
    "in other words", "for example ", "for instance", "on the other hand", "however", "but ", "try again",
    "not correct", "that's not right", "mistake", "recall that", "note that", "step by step", "step 1",
    "consider", "suppose",
)
NGRAM = 20
PHRASE_SCALE = 20


def ngram_repetition_ratio(text: str, n: int = NGRAM) -> float:
    """Fraction of the word n-grams that repeat an earlier one (0 for text shorter than n words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def has_boxed(text: str) -> bool:
    start = text.rfind("\\boxed{")
    return start >= 0 and "}" in text[start + 7:]


@REWARDS.register("reasoning_pattern")
def reasoning_pattern(prompt: str, completion: str, phrases: Sequence[str] = PHRASES, require_boxed: bool = True,
                      **fields: object) -> RewardOutput:
    """RPR: key reasoning phrases (each counted once) / 20, capped at 1, minus repetition and role leaks."""
    text = completion.lower()
    hits = sum(1 for p in phrases if p in text)
    repetition = ngram_repetition_ratio(text)
    leaks = text.count("user: ")
    total = max(0.0, min(1.0, hits / PHRASE_SCALE) - repetition - leaks)
    if require_boxed and not has_boxed(completion):
        total = 0.0
    return RewardOutput(total=total, components={"phrases": float(hits), "repetition": repetition})
