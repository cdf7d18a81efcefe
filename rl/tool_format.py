"""The tool-call format: how the model is told its tools, how its calls are read, how an answer comes back.

Shared by rlpost's tool episodes (envs/tool_calls.py) and the OpenAI-compatible endpoint
(rollout/chat_session.py). Tools are OpenAI function schemas (`{"type": "function", "function": {"name",
"description", "parameters"}}`), the form `apply_chat_template(tools=...)` takes. The formats (`CALL_FORMATS`,
chosen by the job key `agent.tool_format`):

- `hermes`: the chat template's own tool syntax of Qwen2.5/Qwen3/Hermes-style templates. The template renders
  the tool list itself (into the system turn) and teaches `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`; a tool's answer is the template's `tool` turn (Qwen: a user turn of `<tool_response>`s).
- `llama3_json`: Llama-3.1/3.2-style templates: the call is the whole turn, one JSON object `{"name": ...,
  "parameters": {...}}`; the answer is the template's `tool` turn (Llama: `ipython`).
- `tags`: rlpost's documented fallback for a template without tool syntax (SmolLM2): rlpost's own system text
  describes the tools and the call `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, after which the
  model stops (`</tool_call>` is a stop string; an opening tag followed by a whole JSON object but no closing
  tag is read as that call); the answer is a `tool` turn where the template renders one, else
  a `user` turn holding `<tool_response>...</tool_response>`.

`auto` (the default) picks, by name, the first native format whose markers the chat template contains
and that really renders `tools=` (a probe tool's name shows in the rendering); else `tags`.

Framing is read off the template with sentinels (`continuation`): the conversation is rendered with a placeholder
for an assistant turn the caller already holds as tokens, and only the text after it is kept (the end of that
turn, the new turns, the generation prompt). The model's own tokens are never re-tokenised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
_TAGGED = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
_HELD, _ANSWER = "\x00RLPOST-HELD-TURN\x00", "\x00RLPOST-TOOL-ANSWER\x00"
_SYSTEM, _USER = "\x00RLPOST-SYSTEM\x00", "\x00RLPOST-USER\x00"
_PROBE = "rlpost_probe_tool"

ToolCall = tuple[str, Mapping[str, object]]  # (name, arguments)
Parsed = list[ToolCall] | str | None  # the turn's calls; an error to show the model; None: no call (an answer)
Schema = Mapping[str, object]  # an OpenAI function tool: {"type": "function", "function": {...}}
ChatMessage = Mapping[str, object]  # a message as apply_chat_template takes it


def tool_schema(name: str, description: str, parameters: Mapping[str, object]) -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _function(schema: Schema) -> Mapping[str, object]:
    fn = schema.get("function", schema)
    assert isinstance(fn, Mapping)  # the endpoint validates requests' tools; envs build them with tool_schema
    return fn


def _one_call(call: object, key: str) -> ToolCall | str:
    if isinstance(call, list) and len(call) == 1:  # [{"name": ...}]: the list form some models write
        call = call[0]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return f"error: a tool call is a JSON object with a \"name\" and an \"{key}\" object"
    arguments = call.get(key, call.get("arguments", {}))
    if not isinstance(arguments, dict):
        return f"error: \"{key}\" must be a JSON object"
    return call["name"], arguments


def parse_tagged(text: str) -> Parsed:
    """Every `<tool_call>{json}</tool_call>` of a turn (hermes and tags: whitespace inside is JSON's)."""
    blocks = _TAGGED.findall(text)
    if not blocks:
        return None if CALL_OPEN not in text else _unclosed_call(text.rpartition(CALL_OPEN)[2])
    return _json_calls(blocks, "arguments", f"{CALL_OPEN}{{\"name\": ..., \"arguments\": {{...}}}}{CALL_CLOSE}")


def _json_calls(parts: Sequence[str], key: str, example: str) -> Parsed:
    """Each part one JSON call with its arguments under `key`; the first error (naming `example`) instead."""
    calls: list[ToolCall] = []
    for part in parts:
        try:
            call = _one_call(json.loads(part), key)
        except json.JSONDecodeError as exc:
            return f"error: the tool call is not valid JSON ({exc.msg}); write {example}"
        if isinstance(call, str):
            return call
        calls.append(call)
    return calls


def _unclosed_call(tail: str) -> Parsed:
    """An opening tag without its closing one: the JSON object right after it is the call, whatever follows
    (vLLM's hermes parser also reads an unclosed tag; a small model often writes the object, then talks on)."""
    try:
        call = _one_call(json.JSONDecoder().raw_decode(tail.lstrip())[0], "arguments")
    except json.JSONDecodeError:
        return f"error: a tool call is one JSON object and must end with {CALL_CLOSE}"
    return call if isinstance(call, str) else [call]


def parse_call(text: str) -> ToolCall | str | None:
    """The turn's last tool call in the tag format as (name, arguments); an error message; None: no call."""
    parsed = parse_tagged(text)
    return parsed[-1] if isinstance(parsed, list) else parsed


def parse_llama_json(text: str) -> Parsed:
    """A Llama-3.1-style turn that is one JSON call `{"name": ..., "parameters": {...}}` (or several, `;`-joined)."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{") or '"name"' not in body:
        return None  # prose: the final answer
    return _json_calls(body.split(";"), "parameters", '{"name": ..., "parameters": {...}}')


def _json_lines(tools: Sequence[Schema]) -> str:
    return "\n".join(json.dumps({"name": f.get("name"), "description": f.get("description", ""),
                                 "parameters": f.get("parameters", {})}) for f in map(_function, tools))


def tags_system_text(tools: Sequence[Schema]) -> str:
    """What the model is told about its tools in the tag format (agent.system_prompt: null)."""
    return ("You can call tools. To call one, write exactly\n" + CALL_OPEN + '{"name": "<tool>", "arguments": '
            '{<arguments>}}' + CALL_CLOSE + "\nand stop; its answer comes back in the next message. Tools:\n"
            + _json_lines(tools) + "\nWhen you have the answer, give it without a tool call.")


def _hermes_text(tools: Sequence[Schema]) -> str:  # Qwen2.5's own words, for a template that cannot carry them
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            "function signatures within <tools></tools> XML tags:\n<tools>\n"
            + "\n".join(json.dumps(dict(t)) for t in tools) + "\n</tools>\n\nFor each function call, return a json "
            "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _llama_text(tools: Sequence[Schema]) -> str:  # Llama-3.1's own words (its template puts them in a user turn)
    return ("Given the following functions, please respond with a JSON for a function call with its proper arguments "
            'that best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": '
            "dictionary of argument name and its value}. Do not use variables.\n\n"
            + "\n\n".join(json.dumps(dict(t), indent=4) for t in tools))


@dataclass(frozen=True)
class CallFormat:
    """One way of calling tools: how they are described, how a call is written and read."""

    name: str
    native: bool
    """The chat template renders the tool list itself (`apply_chat_template(tools=...)`)."""
    markers: tuple[str, ...]
    """`auto` picks this format for a template containing all of these (and rendering `tools=`)."""
    stop: tuple[str, ...]
    """Stop strings that end a turn after a call (none: the model ends its turn as the template teaches)."""
    parse: Callable[[str], Parsed]
    describe: Callable[[Sequence[Schema]], str]
    """The tools' description where the template does not put its own in the system turn."""
    write: Callable[[str, Mapping[str, object]], str]
    """A call as the model writes it (an earlier call in a history the template cannot render)."""
    strip_calls: Callable[[str], str]
    """A turn's text without its calls (the `content` beside `tool_calls` in an OpenAI reply)."""


def _without_tags(text: str) -> str:
    return _TAGGED.sub("", text).strip()


CALL_FORMATS: Registry[CallFormat] = Registry("tool-call format")
for _fmt in (
    CallFormat("hermes", True, ("<tool_call>", "tools"), (CALL_CLOSE,), parse_tagged, _hermes_text,
               lambda n, a: f"{CALL_OPEN}\n{json.dumps({'name': n, 'arguments': a})}\n{CALL_CLOSE}", _without_tags),
    CallFormat("llama3_json", True, ('"parameters"', "tools"), (), parse_llama_json, _llama_text,
               lambda n, a: json.dumps({"name": n, "parameters": a}), lambda text: ""),  # the call is the turn
    CallFormat("tags", False, (), (CALL_CLOSE,), parse_tagged, tags_system_text,
               lambda n, a: f"{CALL_OPEN}{json.dumps({'name': n, 'arguments': a})}{CALL_CLOSE}", _without_tags),
):
    CALL_FORMATS.register(_fmt.name)(_fmt)
TAGS = CALL_FORMATS.get("tags")
AUTO = "auto"


def _template(tokenizer: PreTrainedTokenizerBase) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return " ".join(template.values()) if isinstance(template, dict) else str(template)


def detect(tokenizer: PreTrainedTokenizerBase, name: str = AUTO) -> CallFormat:
    """The format `name` (agent.tool_format), or for `auto` the template's own (module docstring), else tags."""
    if name != AUTO:
        return CALL_FORMATS.get(name)
    template = _template(tokenizer)
    probe = [tool_schema(_PROBE, "probe", {"type": "object", "properties": {}})]
    for fmt_name in CALL_FORMATS.names():
        fmt = CALL_FORMATS.get(fmt_name)
        if fmt.native and all(m in template for m in fmt.markers):
            rendered = _apply(tokenizer, [{"role": "user", "content": "q"}], probe)
            if rendered is not None and _PROBE in rendered:
                return fmt
    return TAGS


def _apply(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
           tools: Sequence[Schema] | None = None) -> str | None:
    """The template's rendering (generation prompt added), or None where the template refuses the messages."""
    turns = [dict(m) for m in messages]
    try:  # transformers types messages as str -> str; an assistant turn's `tool_calls` is a list (templates read it)
        text = tokenizer.apply_chat_template(turns, tools=[dict(t) for t in tools or []] or None,  # type: ignore[arg-type]
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may refuse a role or a shape (jinja raise_exception)
        return None
    assert isinstance(text, str)  # tokenize=False renders text
    return text


def answer_turn(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str]:
    """(role, head, foot) of a tool's answer: a `tool` turn where the template renders one, else a `user` turn
    of `<tool_response>` tags."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _HELD}]
    for role, head, foot in (("tool", "", ""), ("user", RESPONSE_OPEN, RESPONSE_CLOSE)):
        text = _apply(tokenizer, [*turns, {"role": role, "content": head + _ANSWER + foot}])
        if text is not None and _HELD in text and _ANSWER in text.partition(_HELD)[2]:
            return role, head, foot
    return "tool", RESPONSE_OPEN, RESPONSE_CLOSE


def for_template(fmt: CallFormat, tokenizer: PreTrainedTokenizerBase,
                 messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The messages as the template takes them: a template without tool syntax gets calls as the format's text
    and answers as its answer turn; a native template gets them as they are."""
    if fmt.native:
        return list(messages)
    role, head, foot = answer_turn(tokenizer)
    out: list[ChatMessage] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        assert isinstance(calls, list)  # normalised by the caller
        if m.get("role") == "tool":
            out.append({"role": role, "content": head + str(m.get("content") or "") + foot})
        elif calls:
            text = "".join(fmt.write(str(c["function"]["name"]), c["function"]["arguments"]) for c in calls)
            out.append({"role": m["role"], "content": str(m.get("content") or "") + text})
        else:
            out.append(m)
    return out


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage], fmt: CallFormat = TAGS,
           tools: Sequence[Schema] = ()) -> str:
    """The conversation as the model reads it, ending with the generation prompt; `tools` described the format's
    way (a native template renders them; the tag format's system text is put first in the system turn)."""
    messages = list(messages)
    if tools and not fmt.native:
        system = fmt.describe(tools)
        if messages and messages[0].get("role") == "system":
            system += "\n\n" + str(messages[0].get("content") or "")
            messages = messages[1:]
        messages = [{"role": "system", "content": system}, *messages]
    if not getattr(tokenizer, "chat_template", None):  # base models: the plain text of envs/base.render_prompt
        return "".join(str(m.get("content") or "") + ("\n\n" if m.get("role") == "system" else "\n")
                       for m in for_template(TAGS, tokenizer, messages))
    text = _apply(tokenizer, for_template(fmt, tokenizer, messages), tools if fmt.native else None)
    if text is None:
        raise UserError("the model's chat template refused these messages (a role or an order it does not accept)")
    return text


def continuation(tokenizer: PreTrainedTokenizerBase, before: Sequence[ChatMessage], after: Sequence[ChatMessage],
                 fmt: CallFormat = TAGS, tools: Sequence[Schema] = ()) -> str:
    """What the template renders after an assistant turn held as tokens (`before` it, `after` it): the end of that
    turn, the `after` messages, the generation prompt."""
    text = render(tokenizer, [*before, {"role": "assistant", "content": _HELD}, *after], fmt, tools)
    return text[text.index(_HELD) + len(_HELD):]


def observation_frame(tokenizer: PreTrainedTokenizerBase, fmt: CallFormat = TAGS) -> tuple[str, str]:
    """(text before, text after) a tool's answer, to append after the model's tool-call turn."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n" + RESPONSE_OPEN, RESPONSE_CLOSE + "\n"
    try:
        after = continuation(tokenizer, [{"role": "user", "content": "q"}], [{"role": "tool", "content": _ANSWER}], fmt)
    except UserError:  # the template renders no answer turn at all: the tags alone
        return "\n" + RESPONSE_OPEN, RESPONSE_CLOSE + "\n"
    before, _, rest = after.partition(_ANSWER)
    return before, rest


def unclosed(tokenizer: PreTrainedTokenizerBase, last_id: int | None, text: str) -> str:
    """`text` (what follows a held turn) without the turn-closing token the model sampled itself (EOS)."""
    if last_id is None:
        return text
    last = tokenizer.decode([last_id], skip_special_tokens=False)
    if last and last in tokenizer.all_special_tokens and text.startswith(last):
        return text[len(last):]
    return text


def system_prompt(tokenizer: PreTrainedTokenizerBase, fmt: CallFormat, system: str | None,
                  tools: Sequence[Schema]) -> str:
    """The system text of a prompt rendered as [system, user] that tells the model its tools the format's way.

    Native: the text that makes the template's [system, user] rendering equal its own rendering with `tools=`
    (the template's tool block in the system turn), where the template puts its tool block there; otherwise (a
    template that puts it elsewhere, e.g. Llama-3.1's first user turn) the format's description, then `system`."""
    if fmt.native:
        plain = _apply(tokenizer, [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}])
        with_tools = _apply(tokenizer, [*([{"role": "system", "content": system}] if system else []),
                                        {"role": "user", "content": _USER}], tools)
        if plain is not None and with_tools is not None and _SYSTEM in plain:
            head, _, tail = plain.partition(_SYSTEM)
            text = with_tools[len(head):len(with_tools) - len(tail)]
            if (with_tools.startswith(head) and with_tools.endswith(tail)
                    and _apply(tokenizer, [{"role": "system", "content": text},
                                           {"role": "user", "content": _USER}]) == with_tools):
                return text
    return fmt.describe(tools) + ("\n\n" + system if system else "")
