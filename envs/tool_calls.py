"""The tool-call format, tool answers as chat turns, and the per-episode tool env.

Format (the tag format of Hermes/Qwen-style models, documented here because SmolLM2's chat template has no
tool syntax of its own): the model writes

    <tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>

and its turn ends there (`</tool_call>` is a stop string). The answer is appended as a `tool` turn of the
model's chat template, followed by the template's generation prompt, so the model continues as the
assistant: for ChatML (SmolLM2) `<|im_end|>\\n<|im_start|>tool\\n5535<|im_end|>\\n<|im_start|>assistant\\n`.
The framing is read off the template once (with placeholder contents), and only the tool's answer is
tokenised: the model's own tokens are never re-tokenised. A template that cannot render a `tool` turn gets
a `user` turn holding `<tool_response>...</tool_response>`; a model without a template gets those tags alone.
A turn without a tool call is the final answer: the episode ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envs.tools import ToolBox, ToolSpec, describe
from rl.types import Prompt, StepResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
_TURN, _ANSWER = "\x00ASSISTANT-TURN\x00", "\x00TOOL-ANSWER\x00"


def parse_call(text: str) -> tuple[str, Mapping[str, object]] | str | None:
    """The turn's last tool call as (name, arguments); an error message for a malformed one; None: no call."""
    calls = CALL.findall(text)
    if not calls:
        return None if CALL_OPEN not in text else f"error: a tool call must end with {CALL_CLOSE}"
    try:
        call = json.loads(calls[-1])
    except json.JSONDecodeError as exc:
        return f"error: the tool call is not valid JSON ({exc.msg}); write {CALL_OPEN}{{\"name\": ..., " \
               f"\"arguments\": {{...}}}}{CALL_CLOSE}"
    if isinstance(call, list) and len(call) == 1:  # [{"name": ...}]: the list form some models write
        call = call[0]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return "error: a tool call is a JSON object with a \"name\" and an \"arguments\" object"
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return "error: \"arguments\" must be a JSON object"
    return call["name"], arguments


def observation_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(text before, text after) a tool's answer, to append after the model's tool-call turn."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n" + RESPONSE_OPEN, RESPONSE_CLOSE + "\n"
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _TURN}]
    for role, (head, foot) in (("tool", ("", "")), ("user", (RESPONSE_OPEN, RESPONSE_CLOSE))):
        try:
            text = tokenizer.apply_chat_template([*turns, {"role": role, "content": head + _ANSWER + foot}],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template may refuse a role (jinja raise_exception): try the next
            continue
        assert isinstance(text, str)  # tokenize=False renders text
        if _TURN in text and _ANSWER in text and text.index(_TURN) < text.index(_ANSWER):
            before, _, after = text[text.index(_TURN) + len(_TURN):].partition(_ANSWER)
            return before, after
    return "\n" + RESPONSE_OPEN, RESPONSE_CLOSE + "\n"


def system_text(specs: Sequence[ToolSpec]) -> str:
    """What the model is told about its tools and the call format (agent.system_prompt: null)."""
    return ("You can call tools. To call one, write exactly\n" + CALL_OPEN + '{"name": "<tool>", "arguments": '
            '{<arguments>}}' + CALL_CLOSE + "\nand stop; its answer comes back in the next message. Tools:\n"
            + describe(specs) + "\nWhen you have the answer, give it without a tool call.")


def with_tools_prompt(system: str | None, agent_prompt: str | None, specs: Sequence[ToolSpec]) -> str | None:
    """The system prompt of an env whose episodes have tools: the tools' description, then the env's own."""
    if not specs and agent_prompt is None:
        return system
    head = agent_prompt if agent_prompt is not None else system_text(specs)
    return head + ("\n\n" + system if system else "")


@dataclass
class ToolEpisode:
    """One episode's env: a turn with a tool call gets the tool's answer; a turn without one ends it."""

    tokenizer: PreTrainedTokenizerBase
    tools: ToolBox
    frame: tuple[str, str]
    max_observation_tokens: int
    calls: int = 0
    errors: int = 0

    def reset(self, prompt: Prompt) -> None:
        self.calls = self.errors = 0

    def step(self, turn_ids: Sequence[int]) -> StepResult:
        text = self.tokenizer.decode(list(turn_ids), skip_special_tokens=True)
        assert isinstance(text, str)  # one id list decodes to one text
        call = parse_call(text)
        if call is None:
            return StepResult(done=True, info={"calls": self.calls, "errors": self.errors})
        self.calls += 1
        answer = call if isinstance(call, str) else self.tools.call(*call)
        self.errors += answer.startswith("error:")
        ids = self.tokenizer(self.frame[0] + answer + self.frame[1], add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_observation_tokens:  # keep the frame's end, so the model still gets its turn
            tail = self.tokenizer(self.frame[1], add_special_tokens=False)["input_ids"]
            ids = ids[: max(0, self.max_observation_tokens - len(tail))] + tail
        return StepResult(observation_ids=tuple(ids), info={"calls": self.calls, "errors": self.errors})
