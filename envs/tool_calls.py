"""Tool episodes: the prompts that tell the model its tools, and the per-episode env that answers its calls.

The call format (how tools are described, how a call is written and read, how an answer is framed) is the
contract-layer rl/tool_format.py, shared with the OpenAI-compatible endpoint: the chat template's own tool syntax
where it has one (Qwen2.5/Hermes `<tool_call>` JSON, Llama-3.1 JSON; `agent.tool_format: auto`), else rlpost's
documented tag format (SmolLM2's template has none):

    <tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>

A turn with a call gets the tool's answer as the template's tool turn, followed by its generation prompt, so the
model continues as the assistant (for ChatML: `<|im_end|>\\n<|im_start|>tool\\n5535<|im_end|>\\n<|im_start|>
assistant\\n`). Only the answer is tokenised: the model's own tokens are never re-tokenised. A turn without a
call is the final answer: the episode ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envs.tools import ToolBox, ToolSpec
from rl.tool_format import AUTO, TAGS, CallFormat, detect, system_prompt, tool_schema, unclosed
from rl.types import Prompt, StepResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def schemas(specs: Sequence[ToolSpec]) -> list[dict[str, object]]:
    """The tools as OpenAI function schemas (what chat templates' `tools=` takes)."""
    return [tool_schema(s.name, s.description, s.parameters) for s in specs]


def with_tools_prompt(system: str | None, agent_prompt: str | None, specs: Sequence[ToolSpec],
                      tokenizer: PreTrainedTokenizerBase | None = None, tool_format: str = AUTO) -> str | None:
    """The system prompt of an env whose episodes have tools (agent.system_prompt, then the env's own).

    Tag format: `agent_prompt` (null: rlpost's generated description) replaces the description. A native format:
    the template's own tool block, with `agent_prompt` and the env's prompt as the system turn's text (the env's
    [system, user] prompt is then the template's rendering with `tools=`). No tokenizer: the tag format."""
    if not specs and agent_prompt is None:
        return system
    fmt = TAGS if tokenizer is None else detect(tokenizer, tool_format)
    if not fmt.native:
        head = agent_prompt if agent_prompt is not None else fmt.describe(schemas(specs))
        return head + ("\n\n" + system if system else "")
    assert tokenizer is not None  # native formats come from a tokenizer's template
    text = "\n\n".join(t for t in (agent_prompt, system) if t) or None
    return system_prompt(tokenizer, fmt, text, schemas(specs))


@dataclass
class ToolEpisode:
    """One episode's env: a turn with a tool call gets the tool's answer; a turn without one ends it."""

    tokenizer: PreTrainedTokenizerBase
    tools: ToolBox
    frame: tuple[str, str]
    max_observation_tokens: int
    calls: int = 0
    errors: int = 0
    call_format: CallFormat = TAGS

    def reset(self, prompt: Prompt) -> None:
        self.calls = self.errors = 0

    def step(self, turn_ids: Sequence[int]) -> StepResult:
        text = self.tokenizer.decode(list(turn_ids), skip_special_tokens=True)
        assert isinstance(text, str)  # one id list decodes to one text
        parsed = self.call_format.parse(text)
        if parsed is None:
            return StepResult(done=True, info={"calls": self.calls, "errors": self.errors})
        self.calls += 1
        answer = parsed if isinstance(parsed, str) else self.tools.call(*parsed[-1])  # the turn's last call
        self.errors += answer.startswith("error:")
        head = unclosed(self.tokenizer, turn_ids[-1] if turn_ids else None, self.frame[0])
        ids = self.tokenizer(head + answer + self.frame[1], add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_observation_tokens:  # keep the frame's end, so the model still gets its turn
            tail = self.tokenizer(self.frame[1], add_special_tokens=False)["input_ids"]
            ids = ids[: max(0, self.max_observation_tokens - len(tail))] + tail
        return StepResult(observation_ids=tuple(ids), info={"calls": self.calls, "errors": self.errors})
