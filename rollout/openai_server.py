"""An OpenAI-compatible chat-completions endpoint over a rollout engine, recording what it serves.

`ChatServer(engine, tokenizer)` listens on (host, port) (port 0: a free one) and answers
`POST /v1/chat/completions` (messages, max_tokens, temperature, top_p, stop, seed, n=1, tools, tool_choice
"auto"/"none"; `model` is echoed, not checked) and `GET /v1/models`, so any agent written against the OpenAI client
talks to the policy being trained. It samples with the engine the rollout worker owns, so its weights follow the
learner with no extra step.

Tools (OpenAI function schemas) are described in the first request's prompt the call format's way
(rl/tool_format.py: the chat template's own tool syntax where it has one, else rlpost's tag format, whose
`</tool_call>` then ends a turn); the completion's calls come back parsed as the message's `tool_calls` (id,
type function, function.name, function.arguments as a JSON string) with finish_reason "tool_calls". The next
request repeats that message as served and adds `role: tool` answers, framed as the template's tool turn.

Every request names its episode's session in the `X-Rlpost-Session` header (the OpenAI client sends it on every
call when built with `default_headers`); rollout/chat_session.py keeps each session as tokens and refuses a
request that edits the history. Sampling is the session's (the job's temperature and top-p: the learner scores
tokens at that temperature, so a request asking another one gets 400); `max_tokens` defaults to the job's
`rollout.max_new_tokens`. Turn t of an episode is seeded from (the call's seed, its prompt, its episode, t, the
request's `seed`), so an episode samples the same whatever else is in flight.

Batching: requests go to one engine thread, which waits `window_s` after the first for others (and whatever
arrives while the engine is busy waits for the next call), then makes one `engine.generate` call per distinct
sampling setting: N agents' turns share an engine call. Access is guarded like the swarm hub (rl/netauth.py): a
bearer token (required beyond loopback), optional rate limits, the start-up `exposure_line`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rl.batch import RolloutBatch
from rl.netauth import CLIENT_HEADER, Access, Guard, client_id, exposure_line, require_token, send_json
from rl.tool_format import AUTO, CallFormat, Schema, detect
from rl.types import Prompt, RolloutEngine, SamplingParams
from rollout.chat_session import Message, Refused, Session, SessionSpec, normalise, text_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
SESSION_HEADER = "X-Rlpost-Session"
MAX_BODY_BYTES = 8_000_000
Turn = tuple[list[int], list[float], str]  # sampled ids, their logprobs, finish reason


class ChatRequest(BaseModel):
    """The chat-completions fields the endpoint reads; the OpenAI client's others are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = "rlpost"
    messages: list[dict[str, object]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = None
    tools: list[dict[str, object]] | None = None
    """OpenAI function tools (`{"type": "function", "function": {"name", "description", "parameters"}}`)."""
    tool_choice: str | dict[str, object] | None = None
    """"auto" (the default with tools: the model decides) or "none" (described, calls not read); others refused."""
    stream: bool = False
    """Refused when true: replies come whole."""


class _Batcher:
    """One thread calls the engine; requests that arrive within `window_s` (or while it is busy) share a call."""

    def __init__(self, engine: RolloutEngine, window_s: float) -> None:
        self.engine, self.window_s = engine, window_s
        self.calls = self.requests = 0  # engine calls made, requests served: calls < requests when batching works
        self._queue: queue.Queue[tuple[Prompt, SamplingParams, Future[Turn]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="chat-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt, params: SamplingParams) -> Turn:
        future: Future[Turn] = Future()
        self._queue.put((prompt, params, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            items, deadline = [item], time.monotonic() + self.window_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    more = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # close after serving what is here
                    break
                items.append(more)
            self._run(items)

    def _run(self, items: Sequence[tuple[Prompt, SamplingParams, Future[Turn]]]) -> None:
        by_params: dict[SamplingParams, list[tuple[Prompt, Future[Turn]]]] = {}
        for prompt, params, future in items:
            by_params.setdefault(params, []).append((prompt, future))
        for params, group in by_params.items():
            self._generate(group, params)

    def _generate(self, group: Sequence[tuple[Prompt, Future[Turn]]], params: SamplingParams) -> None:
        try:
            batch = self.engine.generate([p for p, _ in group], params)
        except Exception as exc:  # noqa: BLE001 - the request that caused it gets the error; the server goes on
            if len(group) == 1:
                group[0][1].set_exception(exc)
            else:  # e.g. one agent's context over the engine's limit: the others' turns must not fail with it
                for one in group:
                    self._generate([one], params)
            return
        self.calls += 1
        self.requests += len(group)
        for (_, future), turn in zip(group, _rows(batch)):
            future.set_result(turn)


def _rows(batch: RolloutBatch) -> list[Turn]:
    return [(batch.input_ids[i][m].tolist(), batch.sampling_logprobs[i][m].tolist(), batch.finish_reasons[i])
            for i, m in enumerate(batch.loss_mask)]


class ChatServer:
    """The endpoint on (host, port) over `engine` (not owned: closing the server leaves it running)."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, host: str = "127.0.0.1",
                 port: int = 0, access: Access | None = None, window_s: float = 0.02, tool_format: str = AUTO) -> None:
        self.access = access or Access(rate_per_s=None)
        require_token(host, self.access.token, "the chat-completions endpoint",
                      "Give the server an Access(token=...)")
        self.tokenizer = tokenizer
        self.call_format = detect(tokenizer, tool_format)  # agent.tool_format: the template's own, else tags
        self.batcher = _Batcher(engine, window_s)
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"chat": self, "guard": Guard(self.access)})
        self.server = _Server((host, port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="chat-server", daemon=True)
        self.thread.start()
        log.info("chat-completions endpoint %s", self.exposure())

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def exposure(self) -> str:
        host, port = self.server.server_address[:2]
        return exposure_line(str(host), int(port), self.access, tls=False)

    def open_session(self, session_id: str, spec: SessionSpec) -> None:
        with self._lock:
            self.sessions[session_id] = Session(spec)

    def close_session(self, session_id: str) -> Session:
        """Stop serving a session (a request still running finishes first) and hand it over."""
        with self._lock:
            session = self.sessions.pop(session_id)
        with session.lock:
            session.closed = True
        return session

    def abandon(self, session_id: str) -> Session:
        """Like close_session, without waiting for a request in flight (an agent that hangs mid-request)."""
        with self._lock:
            session = self.sessions.pop(session_id)
        session.closed = True
        return session

    def complete(self, session_id: str | None, request: ChatRequest) -> dict[str, object]:
        """One chat completion for the session's next turn, recorded in the session."""
        with self._lock:
            session = self.sessions.get(session_id or "")
        if session is None:
            raise Refused(f"unknown or closed session {session_id!r} (an episode that ended or timed out is closed): "
                          f"send the {SESSION_HEADER} header of an open episode.")
        tools, fmt = _tools(request, self.call_format)
        if request.stream:
            raise Refused("stream=true is not supported by this endpoint; leave `stream` unset.")
        messages = normalise(request.messages)
        with session.lock:
            context = session.context(self.tokenizer, messages, self.call_format, tools)
            params = _params(session.spec, request, fmt.stop if fmt else ())
            seed_tag = "" if request.seed is None else f"#s{request.seed}"
            spec = session.spec
            prompt = Prompt(f"{spec.prompt.prompt_id}#{spec.index}#{session.turns}{seed_tag}", "", context)
            turn = self.batcher.submit(prompt, params)
            reply, message = _reply(self.tokenizer, turn[0], params.stop, fmt)
            if session.closed:  # abandoned while the engine ran: nothing more is recorded
                raise Refused("this session was closed while its request ran (the episode timed out).")
            session.record(messages, context, turn, reply, tools)
        return _response(request.model, message, turn, len(context))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.batcher.close()
        self.thread.join(timeout=5)


def _tools(request: ChatRequest, fmt: CallFormat) -> tuple[list[Schema], CallFormat | None]:
    """The request's tools, and the format its completion's calls are read in (None: none are read)."""
    if request.tool_choice not in (None, "auto", "none"):
        raise Refused(f"tool_choice={request.tool_choice!r} is not supported by this endpoint: use \"auto\" (the "
                      "model decides whether to call a tool) or \"none\"; a call cannot be forced without changing "
                      "what the policy samples.")
    tools: list[Schema] = list(request.tools or [])
    for tool in tools:
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Refused('each of `tools` must be {"type": "function", "function": {"name": ..., "description": ..., '
                          '"parameters": {...}}}')
    return tools, fmt if tools and request.tool_choice != "none" else None


def _params(spec: SessionSpec, request: ChatRequest, call_stop: Sequence[str] = ()) -> SamplingParams:
    base = spec.params
    for name, asked, have in (("temperature", request.temperature, base.temperature),
                              ("top_p", request.top_p, base.top_p)):
        if asked is not None and not base.greedy and abs(asked - have) > 1e-6:
            raise Refused(f"{name}={asked} differs from this run's {name}={have}: the learner scores the tokens at "
                          f"the sampler's settings. Leave {name} unset (or set rollout.{name} in the job).")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    limit = request.max_completion_tokens or request.max_tokens or base.max_new_tokens
    return dataclasses.replace(base, group_size=1, stop=tuple(dict.fromkeys((*base.stop, *stop, *call_stop))),
                               max_new_tokens=limit)


def _reply_text(text: str, stop: Sequence[str]) -> str:
    """The served text without the stop string that ended it (as the OpenAI API returns it)."""
    for s in stop:
        if s and s in text:
            return text[: text.index(s)]
    return text


def _reply(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stop: Sequence[str],
           fmt: CallFormat | None) -> tuple[Message, dict[str, object]]:
    """The served turn as the session keeps it and as the response's message (its calls parsed when tools are on);
    a malformed call is left as text (the agent sees what the model wrote)."""
    text = text_of(tokenizer, ids)
    calls = fmt.parse(text) if fmt is not None else None
    if fmt is None or not isinstance(calls, list):
        content = _reply_text(text, stop)
        return Message("assistant", content), {"role": "assistant", "content": content}
    content = fmt.strip_calls(text)
    served = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
               "function": {"name": name, "arguments": json.dumps(arguments)}} for name, arguments in calls]
    kept = tuple((name, json.dumps(arguments, sort_keys=True)) for name, arguments in calls)
    return Message("assistant", content, kept), {"role": "assistant", "content": content or None, "tool_calls": served}


def _response(model: str, message: dict[str, object], turn: Turn, prompt_tokens: int) -> dict[str, object]:
    ids, _, reason = turn
    finish = "tool_calls" if message.get("tool_calls") else "length" if reason == "length" else "stop"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                      "total_tokens": prompt_tokens + len(ids)}}


class _Handler(BaseHTTPRequestHandler):
    chat: ClassVar[ChatServer]
    guard: ClassVar[Guard]
    timeout = 30  # seconds a client may take to send its request

    def _reply(self, code: int, body: dict[str, object], headers: dict[str, str] | None = None) -> None:
        send_json(self, code, body, headers)

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(code, "invalid_request_error")
        self._reply(code, {"error": {"message": message, "type": kind, "code": code}}, headers)

    def _refused(self) -> bool:
        """Answer 401 or 429 (and return True) unless the request may go on; its body is never read."""
        address, client = str(self.client_address[0]), client_id(self.headers.get(CLIENT_HEADER))
        verdict = self.guard.check(self.headers.get("Authorization"), address, client)
        if verdict.status == 200:
            return False
        self.close_connection = True
        if verdict.status == 401:
            self._error(401, "a valid bearer token is required (the OpenAI client's api_key)",
                        {"WWW-Authenticate": "Bearer"})
        else:
            self._error(429, "rate limit exceeded", {"Retry-After": str(verdict.retry_after_s)})
        return True

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, "not found")
        if not self._refused():
            self._reply(200, {"object": "list", "data": [{"id": "rlpost", "object": "model", "owned_by": "rlpost"}]})
        return None

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, "not found")
        if self._refused():
            return None
        length = int(self.headers.get("Content-Length") or -1)
        if not 0 < length <= MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413, f"body must be 1..{MAX_BODY_BYTES} bytes")
        try:
            request = ChatRequest.model_validate_json(self.rfile.read(length))
            body = self.chat.complete(self.headers.get(SESSION_HEADER), request)
        except ValidationError as exc:
            return self._error(400, f"invalid request: {exc.errors(include_url=False)}")
        except Refused as exc:
            return self._error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - the engine refused the turn (e.g. a prompt over its limit)
            log.warning("chat endpoint: a request failed: %s: %s", type(exc).__name__, exc)
            return self._error(400, f"{type(exc).__name__}: {exc}")
        return self._reply(200, body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet by default
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("chat endpoint: a request from %s failed", client_address, exc_info=True)
