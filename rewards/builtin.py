"""Built-in rewards, registered by name (`rewards: [{name: math_answer}]`).

Answer checks here, the sandboxed code runner in `rewards.code_exec`, the reasoning-pattern reward in
`rewards.reasoning` (rl/registries.py names all three modules; each registers its own).
"""

from __future__ import annotations

import ast
import logging
import operator
import re
import threading
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rewards import RewardOutput
from rl.registries import REWARDS

if TYPE_CHECKING:
    from sympy import Basic

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MATH_VERIFY_TIMEOUT_S = 5


class _NoTimeoutNotice(logging.Filter):
    # Off the main thread we switch math-verify's SIGALRM timeouts off on purpose; it would warn every call.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


def _math_verify_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only works on the main thread; elsewhere run without one.
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@REWARDS.register("math_answer")
def math_answer(prompt: str, completion: str, answer: object = None, final_turn: str | None = None,
                **fields: object) -> float | None:
    """1.0 if the completion's final answer is mathematically equivalent to `answer` (math-verify: boxed
    answers, fractions, LaTeX, and plain numbers such as "12"), else 0.0; None when the sample has no answer.
    In a multi-turn episode only the model's last turn (`final_turn`) is its answer: a number in a tool's answer
    earlier in the transcript is not."""
    if answer is None:
        return None
    completion = completion if final_turn is None else final_turn
    from math_verify import parse, verify

    timeout = _math_verify_timeout()
    gold_text = str(answer)
    if "$" not in gold_text and "\\boxed" not in gold_text:
        gold_text = f"${gold_text}$"  # bare gold answers ("1/2", "\\frac12") parse reliably as inline math
    gold = parse(gold_text, parsing_timeout=timeout)
    pred = parse(completion, parsing_timeout=timeout)
    if not gold or not pred or _restates_the_question(gold, pred):
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def _restates_the_question(gold: list, pred: list) -> bool:
    """A number is asked for and the final answer is a sum or a product still to be computed ("123 * 456" for
    56088, "9 - 4"). math-verify evaluates it and would call it equal, so a policy that cannot multiply learns to
    echo the question (seen: the `pcl` job hit reward 1.0 on 3-digit products in 12 steps, every completion
    truncated). Fractions ("1/2") and roots stay answers. A whole-number factor counts also when math-verify reads
    it as a float: a sentence's full stop makes "226 * 103." the product 226 * 103.0 (seen: the `tool_use` job's
    policy without its tool wrote "226 * 103 is 226 * 103." and was scored correct)."""
    asked, given = _sympy_form(gold), _sympy_form(pred)
    if asked is None or given is None or not asked.is_Number:
        return False
    factors = [a for a in given.args if a.is_Number and abs(a) > 1 and float(a).is_integer()] if given.is_Mul else []
    return bool(given.is_Add) or len(factors) > 1


def _sympy_form(parsed: list) -> Basic | None:
    """math-verify's parse gives [sympy expression, extracted string]; the expression, or None."""
    return next((x for x in parsed if hasattr(x, "is_Number")), None)


@REWARDS.register("last_number")
def last_number(prompt: str, completion: str, answer: object = None, final_turn: str | None = None,
                **fields: object) -> float | None:
    """1.0 if the last number in the completion (an episode: in the model's last turn) equals `answer`
    numerically (commas ignored)."""
    if answer is None:
        return None
    completion = completion if final_turn is None else final_turn
    found = NUMBER.findall(completion.replace(",", ""))
    try:
        return 1.0 if found and float(found[-1]) == float(str(answer).replace(",", "")) else 0.0
    except ValueError:  # a non-numeric gold answer never matches
        return 0.0


@REWARDS.register("verifiers")
def verifiers_score(prompt: str, completion: str, vf_reward: object = None, vf_metrics: object = None,
                    metric: str | None = None, **fields: object) -> float | None:
    """The episode's score from its `verifiers` environment's rubric (agent.verifiers, rollout/verifiers_rollout.py):
    the rubric's weighted reward, or with `metric` one reward function's score; None outside such episodes."""
    if metric is None:
        return None if vf_reward is None else float(vf_reward)  # type: ignore[arg-type]
    if not isinstance(vf_metrics, dict) or metric not in vf_metrics:
        return None
    return float(vf_metrics[metric])


@REWARDS.register("format")
def format_reward(prompt: str, completion: str, pattern: str = r"(?s)<think>.*</think>\s*<answer>.*</answer>",
                  **fields: object) -> float:
    """1.0 if the whole (stripped) completion matches `pattern` (default: think then answer tags)."""
    return 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0


@REWARDS.register("length_penalty")
def length_penalty(prompt: str, completion: str, max_chars: int = 200, **fields: object) -> float:
    """0 up to `max_chars`, then falls linearly to -1 at twice that length (and stays there)."""
    over = max(0, len(completion) - max_chars)
    return -min(1.0, over / max_chars)


@REWARDS.register("digit_fraction")
def digit_fraction(prompt: str, completion: str, **fields: object) -> float | None:
    """Fraction of the completion's non-space characters that are digits or '-': a dense shaping signal
    toward numeric answers (and the learning signal of the `tiny` smoke job, whose random model never
    gets an answer right)."""
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isdigit() or c == "-" for c in chars) / len(chars)


BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
ANSWER_TAG = re.compile(r"(?s)<answer>(.*?)</answer>")
EXPRESSION = re.compile(r"[\d\s+\-*/().]+")


def evaluate_arithmetic(node: ast.AST, used: list[int]) -> float:
    """Value of a + - * / expression over integer literals, appending each literal to `used`."""
    if isinstance(node, ast.Expression):
        return evaluate_arithmetic(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        return BINARY_OPS[type(node.op)](evaluate_arithmetic(node.left, used), evaluate_arithmetic(node.right, used))
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:40]}")


def _candidate_expression(completion: str) -> str | None:
    tagged = ANSWER_TAG.findall(completion)
    text = tagged[-1] if tagged else completion.split("=")[0] if completion.count("=") == 1 else completion
    runs = [r.strip() for r in EXPRESSION.findall(text) if any(ch.isdigit() for ch in r)]
    return max(runs, key=len) if runs else None


@REWARDS.register("countdown")
def countdown(prompt: str, completion: str, numbers: Sequence[int] | None = None, target: int | None = None,
              **fields: object) -> RewardOutput | None:
    """1.0 if the completion's expression (in <answer> tags, else the longest arithmetic run) uses each of
    `numbers` exactly once with + - * / and equals `target`; component `valid` is 1 for a well-formed use."""
    if numbers is None or target is None:
        return None
    expression = _candidate_expression(completion)
    used: list[int] = []
    try:
        value = evaluate_arithmetic(ast.parse(expression or "", mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return RewardOutput(total=0.0, components={"valid": 0.0})
    valid = Counter(used) == Counter(int(n) for n in numbers)
    correct = valid and abs(value - float(target)) < 1e-9
    return RewardOutput(total=float(correct), components={"valid": float(valid)})
