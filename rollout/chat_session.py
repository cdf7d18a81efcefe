"""One episode's conversation on the OpenAI-compatible endpoint, kept as tokens (token-in/token-out).

A session is opened by whoever runs the episode (rollout/endpoint_rollout.py) and named by the client's
`X-Rlpost-Session` header. Its first request is rendered with the model's chat template (generation prompt
added; its `tools` described the call format's way, rl/tool_format.py) and tokenised once: that is the episode's
prompt. Every later request must extend the conversation the session has served: its previous messages, the
assistant reply exactly as the server returned it (its `content` and `tool_calls`), then new messages (`tool`
answers, user turns). Only those new messages are rendered, with the sentinel framing of
rl/tool_format.continuation (the text after the served reply: the template's end of the assistant turn, the new
turns, the generation prompt), and appended to the served tokens, which are never re-tokenised. A request that
edits the history (drops, changes or reorders earlier messages) or changes the tools is refused with 400: the
tokens the learner would train on could not be the ones the model saw.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.tool_format import TAGS, CallFormat, Schema, continuation, render, unclosed
from rl.types import Prompt, SamplingParams
from rollout.engine import Transcript

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Refused(UserError):
    """A request the session cannot serve; its message goes back to the client with HTTP 400."""


@dataclass(frozen=True)
class Message:
    """A request's message as the session compares and renders it: a tool call is its name and arguments
    (canonical JSON); its id is the client's to keep and is not compared."""

    role: str
    content: str
    calls: tuple[tuple[str, str], ...] = ()
    tool_call_id: str = ""

    def for_template(self) -> dict[str, object]:
        message: dict[str, object] = {"role": self.role, "content": self.content}
        if self.calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": json.loads(a)}}
                                     for n, a in self.calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True)
class SessionSpec:
    """What the episode's owner tells the server: the training prompt it stands for, where its row goes, and the
    sampling every turn uses (the job's: the learner scores the tokens at this temperature)."""

    prompt: Prompt
    group: int
    index: int
    params: SamplingParams
    max_turns: int = 1_000_000


@dataclass
class Session:
    spec: SessionSpec
    messages: list[Message] = field(default_factory=list)
    prompt_ids: tuple[int, ...] = ()
    tokens: Transcript = field(default_factory=Transcript)
    turns: int = 0
    finish: str | None = None
    truncation: str = ""
    closed: bool = False
    tools: str = "[]"  # the first request's tools (canonical JSON): the prompt describes them, rendered once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def context(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], fmt: CallFormat = TAGS,
                tools: Sequence[Schema] = ()) -> tuple[int, ...]:
        """The prompt of this request's turn: what the session holds plus its new messages (tokenised once)."""
        if self.closed:
            raise Refused("this session is closed (its episode ended or timed out); open a new one.")
        if self.turns >= self.spec.max_turns:
            self.truncation = "max_turns"
            raise Refused(f"this episode has used its {self.spec.max_turns} model turns (agent.max_turns).")
        if not self.prompt_ids:
            return tuple(_ids(tokenizer, render(tokenizer, [m.for_template() for m in messages], fmt, tools)))
        if canonical(tools) != self.tools:
            raise Refused("the tools differ from this session's first request, whose prompt describes them (rendered "
                          "once): send the same `tools` on every request of a conversation, or start a new session.")
        return (*self.prompt_ids, *self.tokens.ids, *self._delta_ids(tokenizer, messages, fmt, tools))

    def record(self, messages: Sequence[Message], context: Sequence[int], turn: tuple[list[int], list[float], str],
               reply: Message, tools: Sequence[Schema] = ()) -> None:
        """Append a served turn: the new messages' tokens as context (not trained), the sampled ones trained."""
        ids, lps, reason = turn
        if not self.prompt_ids:
            self.prompt_ids, self.tools = tuple(context), canonical(tools)
        else:
            self.tokens.context(list(context[len(self.prompt_ids) + len(self.tokens):]))
        self.tokens.sampled(ids, lps)
        self.messages = [*messages, reply]
        self.turns += 1
        self.finish = reason

    def _delta_ids(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], fmt: CallFormat,
                   tools: Sequence[Schema]) -> list[int]:
        known = len(self.messages)
        if list(messages[:known]) != self.messages or len(messages) == known:
            raise Refused("the messages do not extend this session's conversation: send its previous messages and "
                          "the assistant reply exactly as served (its content and tool_calls), then the new messages. "
                          "An edited history cannot be trained on token-in/token-out; start a new session for it.")
        delta = continuation(tokenizer, [m.for_template() for m in self.messages[:-1]],
                             [m.for_template() for m in messages[known:]], fmt, tools)
        last = (self.tokens.ids[-1:] or self.prompt_ids[-1:])[0]
        return _ids(tokenizer, unclosed(tokenizer, last, delta))  # an EOS the model sampled is not closed twice


def normalise(messages: Sequence[Mapping[str, object]]) -> list[Message]:
    """Each request message as a `Message`; content parts of type text are joined, other parts are refused."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise Refused("only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        out.append(Message(str(m.get("role")), "" if content is None else str(content), _calls(m.get("tool_calls")),
                           str(m.get("tool_call_id") or "")))
    return out


def _calls(tool_calls: object) -> tuple[tuple[str, str], ...]:
    if not tool_calls:
        return ()
    if not isinstance(tool_calls, list):
        raise Refused("a message's tool_calls must be a list")
    return tuple(_call(call) for call in tool_calls)


def _call(call: object) -> tuple[str, str]:
    fn = call.get("function") if isinstance(call, dict) else None
    arguments = fn.get("arguments", "{}") if isinstance(fn, dict) else None
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(parsed, dict):
        raise Refused('each of a message\'s tool_calls must be {"type": "function", "function": {"name": ..., '
                      '"arguments": "<a JSON object>"}}, as the server returned it')
    return fn["name"], json.dumps(parsed, sort_keys=True)


def canonical(tools: Sequence[Schema]) -> str:
    return json.dumps(list(tools), sort_keys=True)


def text_of(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special: bool = True) -> str:
    text = tokenizer.decode(list(ids), skip_special_tokens=skip_special)
    assert isinstance(text, str)  # one sequence of ids decodes to one text
    return text


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
