"""`name: judge`: a generative judge behind an OpenAI-compatible chat endpoint scores each completion.

    rewards:
      - {name: judge, url: "http://127.0.0.1:8000/v1", model: Qwen/Qwen2.5-7B-Instruct, on_error: zero}

Each sample's `prompt` template is filled with its fields and sent as one chat request; the score is the last
match of `parse` in the answer (its first group), mapped to [0, 1] by `score_range` when `normalize`. At most
`concurrency` requests are in flight. A try that times out (`timeout_s`), cannot connect, gets HTTP 5xx/429 or
an answer without a usable score is retried `retries` times after a short backoff; then that sample gets the
judge's `on_error` fallback, like a failing reward function (rewards/calling.py `call_service`). A 4xx answer
(wrong model name, bad key) is not retried: asking again will not fix it.

One batch is one event loop run, with its own client: an async HTTP client's pooled connections belong to the
loop that opened them, so a client kept across `asyncio.run` calls would fail on its second batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from rl.errors import UserError
from rl.openai_api import openai_module
from rl.registries import REWARD_MODELS

if TYPE_CHECKING:
    import openai

    from rl.config.rewards import JudgeReward

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_S = 0.25
"""Wait before the first retry; doubled for each further one, up to BACKOFF_MAX_S."""
BACKOFF_MAX_S = 2.0
NO_KEY = "none"
"""The API key sent when `api_key_env` is null (the client needs one; local servers ignore it)."""

Messages = list[dict[str, str]]


class JudgeError(Exception):
    """A sample the judge could not score (its message is the cause that RewardTerm logs once)."""


class _Retryable(Exception):
    """One try failed in a way another try may not: `kind` groups causes for the once-per-cause log."""

    def __init__(self, kind: str, message: str, example: str = "") -> None:
        super().__init__(message)
        self.kind, self.example = kind, example


def _run(coro: Coroutine[object, object, T]) -> T:
    """`asyncio.run(coro)` from any thread; from inside a running loop (an async actor, a notebook) it runs on a
    thread of its own, since a loop cannot be nested."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="judge") as pool:
        return pool.submit(asyncio.run, coro).result()


def _api_key(env: str | None) -> str:
    if env is None:
        return NO_KEY
    key = os.environ.get(env)
    if not key:
        raise UserError(f"reward judge: the environment variable {env} (its `api_key_env`) is not set. Export it "
                        "with the endpoint's API key, or set `api_key_env: null` for a server that needs none.")
    return key


def _require_openai() -> None:
    openai_module("reward judge (its client talks to the judge's endpoint)")


@REWARD_MODELS.register("judge")
class JudgeScorer:
    """Built once per run; each call sends the batch's requests, `concurrency` at a time."""

    def __init__(self, cfg: JudgeReward) -> None:
        _require_openai()  # fail at start-up, not at the first batch
        self.cfg = cfg
        self.api_key = _api_key(cfg.api_key_env)
        self.parse = re.compile(cfg.parse)
        self.counts: Counter[str] = Counter()
        """requests, retries, and failures by kind (timeout, unreachable, http NNN, garbage, placeholder)."""
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, object]]) -> list[float | Exception]:
        requests = [self._messages(p, c, f) for p, c, f in zip(prompts, completions, fields)]
        return _run(self._batch(requests))

    def close(self) -> None:
        """Nothing outlives a batch (each batch's client is closed when it ends)."""

    # ----- one sample ------------------------------------------------------------------------------------
    def _messages(self, prompt: str, completion: str, fields: Mapping[str, object]) -> Messages | JudgeError:
        values = {**fields, "prompt": prompt, "completion": completion}
        try:
            text = self.cfg.prompt.format_map(values)
        except KeyError as exc:
            self._count("failed: placeholder")
            return JudgeError(f"the judge prompt names {{{exc.args[0]}}}, which this sample does not have (its "
                              f"fields: {', '.join(sorted(values))}); give the env that field or change `prompt`")
        except (LookupError, AttributeError, ValueError, TypeError) as exc:
            self._count("failed: placeholder")
            return JudgeError(f"the judge prompt cannot be filled for this sample: {type(exc).__name__}: {exc}")
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system is not None else []
        return [*system, {"role": "user", "content": text}]

    def _score(self, answer: str) -> float:
        """The last match of `parse`, checked against `score_range` and normalized; _Retryable if unusable."""
        cfg, text = self.cfg, answer
        matches = [m.group(1) for m in self.parse.finditer(text) if m.group(1) is not None]
        try:
            score = float(matches[-1])
        except (IndexError, ValueError):
            raise _Retryable("garbage", f"the judge's answer has no score (parse {cfg.parse!r})", text[:200]) from None
        if cfg.score_range is None:
            if not math.isfinite(score):
                raise _Retryable("garbage", "the judge's score is not finite", text[:200])
            return score
        low, high = cfg.score_range
        if not low <= score <= high:
            raise _Retryable("garbage", f"the judge's score is outside score_range [{low:g}, {high:g}]", text[:200])
        return (score - low) / (high - low) if cfg.normalize else score

    async def _ask(self, client: openai.AsyncOpenAI, messages: Messages) -> float:
        """One try: the request, bounded by timeout_s, and its score."""
        openai = openai_module("reward judge")
        cfg = self.cfg
        self._count("requests")
        try:
            reply = await asyncio.wait_for(client.chat.completions.create(
                model=cfg.model, messages=messages,  # type: ignore[arg-type]  # plain role/content dicts
                max_tokens=cfg.max_tokens, temperature=cfg.temperature), cfg.timeout_s)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            late = f"the judge at {cfg.url} did not answer within timeout_s={cfg.timeout_s:g}"
            raise _Retryable("timeout", late) from None
        except openai.APIConnectionError as exc:
            why = exc.__cause__ or exc  # the client's own message is only "Connection error."
            raise _Retryable("unreachable", f"the judge at {cfg.url} is unreachable ({why})") from None
        except openai.APIStatusError as exc:
            message = f"the judge at {cfg.url} answered HTTP {exc.status_code}: {str(exc)[:200]}"
            if exc.status_code >= 500 or exc.status_code == 429:
                raise _Retryable(f"http {exc.status_code}", message) from None
            raise JudgeError(message + " (not retried: check url, model and api_key_env)") from None
        except (openai.APIError, json.JSONDecodeError) as exc:  # a 2xx body that is not a chat completion
            raise _Retryable("garbage", f"the judge at {cfg.url} sent no chat completion ({exc})") from None
        # The client builds its reply without validating it: a 200 with another body (an HTML page, an error
        # object, no message) gets here as text or as a completion with parts missing.
        choices = getattr(reply, "choices", None)
        content = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
        if not isinstance(content, str):
            raise _Retryable("garbage", f"the judge at {cfg.url} sent no chat completion", str(reply)[:200])
        return self._score(content)

    async def _judge(self, client: openai.AsyncOpenAI, slots: asyncio.Semaphore, messages: Messages
                     ) -> float | Exception:
        tries = self.cfg.retries + 1
        for attempt in range(tries):
            try:
                async with slots:  # the backoff below waits outside: a slot is a request in flight
                    return await self._ask(client, messages)
            except JudgeError as exc:
                self._count("failed: client error")
                return exc
            except _Retryable as exc:
                self._note(exc, last=attempt == tries - 1)
                if attempt == tries - 1:
                    return JudgeError(f"{exc} ({tries} tr{'y' if tries == 1 else 'ies'})")
            await asyncio.sleep(min(BACKOFF_S * 2 ** attempt, BACKOFF_MAX_S))
        raise AssertionError("unreachable: the last try returns")

    async def _batch(self, requests: list[Messages | JudgeError]) -> list[float | Exception]:
        openai = openai_module("reward judge")
        slots = asyncio.Semaphore(self.cfg.concurrency)
        todo = {i: m for i, m in enumerate(requests) if not isinstance(m, JudgeError)}
        async with openai.AsyncOpenAI(base_url=self.cfg.url, api_key=self.api_key, max_retries=0,
                                      timeout=self.cfg.timeout_s) as client:
            scores = await asyncio.gather(*(self._judge(client, slots, m) for m in todo.values()))
        out: list[float | Exception] = [m if isinstance(m, JudgeError) else 0.0 for m in requests]
        for i, score in zip(todo, scores):
            out[i] = score
        return out

    # ----- counters and the once-per-cause log ---------------------------------------------------------------
    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _note(self, exc: _Retryable, last: bool) -> None:
        """Count the failed try; log the first retry of each kind (a last try's failure is the sample's error,
        which RewardTerm logs once per cause)."""
        with self._lock:
            self.counts[f"failed: {exc.kind}" if last else "retries"] += 1
            first = not last and exc.kind not in self._logged
            if first:
                self._logged.add(exc.kind)
        if first:
            example = f"; the answer began {exc.example!r}" if exc.example else ""
            log.warning("reward judge: a try failed (%s%s); retrying, up to %d retries per sample. Logged once per "
                        "cause.", exc, example, self.cfg.retries)
