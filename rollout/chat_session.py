"""One episode's conversation on the OpenAI-compatible endpoint, kept as tokens (token-in/token-out).

A session is opened by whoever runs the episode (rollout/endpoint_rollout.py) and named by the client's
`X-Rlpost-Session` header. Its first request is rendered with the model's chat template (generation prompt
added) and tokenised once: that is the episode's prompt. Every later request must extend the conversation the
session has served: its previous messages, the assistant reply exactly as the server returned it, then new
messages. Only those new messages are rendered, with the sentinel technique of envs/tool_calls.py (render the
conversation with a placeholder for the served reply and keep the text after it: the template's end of the
assistant turn, the new turns, the generation prompt), and appended to the served tokens, which are never
re-tokenised. A request that edits the history (drops, changes or reorders earlier messages) is refused with 400:
the tokens the learner would train on could not be the ones the model saw.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.types import Prompt, SamplingParams
from rollout.engine import Transcript

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = tuple[str, str]  # (role, content): what a request's message means to the chat template
_SERVED = "\x00RLPOST-SERVED-REPLY\x00"


class Refused(UserError):
    """A request the session cannot serve; its message goes back to the client with HTTP 400."""


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
    lock: threading.Lock = field(default_factory=threading.Lock)

    def context(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> tuple[int, ...]:
        """The prompt of this request's turn: what the session holds plus its new messages (tokenised once)."""
        if self.closed:
            raise Refused("this session is closed (its episode ended or timed out); open a new one.")
        if self.turns >= self.spec.max_turns:
            self.truncation = "max_turns"
            raise Refused(f"this episode has used its {self.spec.max_turns} model turns (agent.max_turns).")
        if not self.prompt_ids:
            return tuple(_ids(tokenizer, render(tokenizer, messages)))
        return (*self.prompt_ids, *self.tokens.ids, *self._delta_ids(tokenizer, messages))

    def record(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], context: Sequence[int],
               turn: tuple[list[int], list[float], str], reply: str) -> None:
        """Append a served turn: the new messages' tokens as context (not trained), the sampled ones trained."""
        ids, lps, reason = turn
        if not self.prompt_ids:
            self.prompt_ids = tuple(context)
        else:
            self.tokens.context(list(context[len(self.prompt_ids) + len(self.tokens):]))
        self.tokens.sampled(ids, lps)
        self.messages = [*messages, ("assistant", reply)]
        self.turns += 1
        self.finish = reason

    def _delta_ids(self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
        known = len(self.messages)
        if list(messages[:known]) != self.messages or len(messages) == known:
            raise Refused("the messages do not extend this session's conversation: send its previous messages and "
                          "the assistant reply exactly as served, then the new messages. An edited history cannot be "
                          "trained on token-in/token-out; start a new session for it.")
        served = [*self.messages[:-1], ("assistant", _SERVED)]
        text = render(tokenizer, [*served, *messages[known:]])
        delta = text[text.index(_SERVED) + len(_SERVED):]
        last = text_of(tokenizer, self.tokens.ids[-1:] or self.prompt_ids[-1:], skip_special=False)
        if last and last in tokenizer.all_special_tokens and delta.startswith(last):
            delta = delta[len(last):]  # the model closed its turn itself (EOS sampled): do not close it twice
        return _ids(tokenizer, delta)


def normalise(messages: Sequence[Mapping[str, object]]) -> list[Message]:
    """(role, text) per message; content parts of type text are joined, other parts are refused."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise Refused("only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        out.append((str(m.get("role")), "" if content is None else str(content)))
    return out


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """The conversation as the model's chat template renders it, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):  # base models: the plain text of envs/base.render_prompt
        return "".join(content + ("\n\n" if role == "system" else "\n") for role, content in messages)
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=True)
    assert isinstance(text, str)  # tokenize=False renders text
    return text


def text_of(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special: bool = True) -> str:
    text = tokenizer.decode(list(ids), skip_special_tokens=skip_special)
    assert isinstance(text, str)  # one sequence of ids decodes to one text
    return text


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
