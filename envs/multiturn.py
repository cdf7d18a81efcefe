"""Multi-turn environments: the model acts, the environment answers, token-in/token-out.

An episode starts from a `Prompt`'s token ids. Each turn the policy generates tokens (`generate_fn`),
the env's `step` looks at them and either ends the episode or returns observation tokens that are
appended to the context. Model tokens keep their sampling logprobs and are trained on; observation
tokens are context only (`loss_mask` False, logprob 0). Nothing is ever re-tokenised: the sequence is
exactly the tokens that were sampled or returned, so the learner scores what the sampler saw.

    env = CalculatorEnv(tokenizer)
    episode = run_episode(env, prompt, generate_fn, max_new_tokens=64, max_turns=4)
    episode.completion_ids, episode.loss_mask, episode.logprobs   # all the same length

`generate_fn(token_ids, max_new_tokens) -> (new_token_ids, logprobs)` is any sampler (an HF model, a
vLLM engine, a script in tests); this module does not import the rollout package.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rl.types import MultiTurnEnv, Prompt, StepResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GenerateFn = Callable[[Sequence[int], int], tuple[Sequence[int], Sequence[float]]]


@dataclass(frozen=True)
class Episode:
    """One rollout: everything after the prompt, model and env tokens interleaved.

    completion_ids [L], loss_mask [L] (True on model tokens), logprobs [L] (0 on env tokens).
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    logprobs: tuple[float, ...]
    turns: int
    finish_reason: str  # "stop": the env ended it; "length": turn or token budget ran out


def run_episode(env: MultiTurnEnv, prompt: Prompt, generate_fn: GenerateFn, max_new_tokens: int,
                max_turns: int = 4, max_total_tokens: int | None = None) -> Episode:
    """Alternate model turns (`generate_fn`, at most `max_new_tokens` each) and env steps."""
    budget = max_total_tokens if max_total_tokens is not None else max_new_tokens * max_turns
    env.reset(prompt)
    ids: list[int] = []
    mask: list[bool] = []
    lps: list[float] = []
    finish, turns = "length", 0
    while turns < max_turns and len(ids) < budget:
        new, new_lps = generate_fn(list(prompt.token_ids) + ids, min(max_new_tokens, budget - len(ids)))
        new, new_lps = list(new), list(new_lps)
        if len(new) != len(new_lps):
            raise ValueError(f"generate_fn returned {len(new)} tokens but {len(new_lps)} logprobs")
        turns += 1
        ids += new
        mask += [True] * len(new)
        lps += new_lps
        result = env.step(new)
        if result.done:
            finish = "stop"
            break
        observation = list(result.observation_ids)[: max(0, budget - len(ids))]
        ids += observation
        mask += [False] * len(observation)
        lps += [0.0] * len(observation)
    return Episode(tuple(prompt.token_ids), tuple(ids), tuple(mask), tuple(float(x) for x in lps), turns, finish)


CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
OPS: dict[type[ast.AST], Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}
MAX_EXPONENT = 64


def calculate(expression: str) -> float:
    """Value of an arithmetic expression (numbers, + - * / **, parentheses); ValueError otherwise."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:  # keep 9**9**9 from hanging the env
                raise ValueError("exponent too large")
            return OPS[type(node.op)](left, right)
        raise ValueError("only numbers, + - * / ** and parentheses are allowed")

    try:
        return walk(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None


class CalculatorEnv:
    """A calculator tool: the model writes `<calc>12*7</calc>`, the env appends `<result>84</result>`.

    A turn without a call ends the episode (the model has answered); rewards score the final text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def reset(self, prompt: Prompt) -> None:
        self.calls = 0

    def step(self, turn_ids: Sequence[int]) -> StepResult:
        text = self.tokenizer.decode(list(turn_ids), skip_special_tokens=True)
        # transformers types decode's result as str | list[str]; one id list decodes to one str
        calls = CALL.findall(text)  # type: ignore[arg-type]
        if not calls:
            return StepResult(done=True, info={"calls": self.calls})
        self.calls += 1
        try:
            value = calculate(calls[-1])
            shown = str(int(value)) if float(value).is_integer() else f"{value:.6g}"
        except ValueError as exc:
            shown = f"error: {exc}"
        text = f"<result>{shown}</result>"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return StepResult(observation_ids=tuple(ids), info={"calls": self.calls})
