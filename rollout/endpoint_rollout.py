"""Training an agent written against the OpenAI client: its conversations, as served, are the episodes.

`EndpointRollout.generate(prompts, params)` has the engine's signature and returns the same `RolloutBatch` as
rollout/episodes.EpisodeRollout. It serves the engine on a loopback chat-completions endpoint
(rollout/openai_server.py, with a random bearer token) and calls the user's agent
`run(client: openai.OpenAI, question: str, fields: dict) -> None` `group_size` times per prompt, `concurrency` at
a time, each with its own client whose `X-Rlpost-Session` header names its episode. When the agent returns, the
session's tokens become the row: `[first request's prompt][reply 1][new messages][reply 2]...`, `loss_mask` True
exactly on the served replies, `sampling_logprobs` the engine's (0 elsewhere); the `group_size` episodes of one
prompt are its GRPO group and the rewards score the whole transcript with the prompt's fields.

An agent that raises, or runs past `timeout_s` (its session is closed at once, so a late request is refused and
nothing more is recorded), ends its episode with what it had and finish reason `abort`; `agent_error` /
`agent_timeout` in the row's meta count them (and a warning says how many). An episode that was refused a turn
past `agent.max_turns` ends with `length` (truncation `max_turns`); one whose tokens after the prompt pass
`agent.max_total_tokens` has its row cut there, exactly as served, and ends with `length` (truncation
`token_budget`; the agent's turns past the budget are not trained on).

`ServedRollout` is the machinery (sessions, seeds, time limits, the rows) for any `Runner` that holds the episodes'
conversations: `AgentRunner` here (threads, the sync OpenAI client), rollout/verifiers_rollout.py (a `verifiers`
environment's own rollouts, on an event loop).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rl.batch import RolloutBatch
from rl.netauth import Access
from rl.openai_api import openai_module
from rl.types import Prompt, RolloutEngine, SamplingParams
from rollout.chat_session import Session, SessionSpec, text_of
from rollout.engine import Sample, build_batch
from rollout.openai_server import SESSION_HEADER, ChatServer

if TYPE_CHECKING:
    import openai
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
Agent = Callable[["openai.OpenAI", str, dict[str, object]], None]


@dataclass(frozen=True)
class Episode:
    """One episode on the endpoint: its session (the `X-Rlpost-Session` header) and what it stands for."""

    session_id: str
    spec: SessionSpec


@dataclass
class Outcome:
    """How an episode's runner left it: "ok", "error" (it raised) or "timeout" (cut off), and fields for the row's
    meta (they reach the rewards, e.g. a verifiers rubric's score)."""

    status: str = "ok"
    meta: dict[str, object] = field(default_factory=dict)


class Runner(Protocol):
    """Drives the episodes' conversations against the endpoint at `url` (bearer `token`); calls `cut(i)` the moment
    episode i runs past its time limit (its session is closed: a late request is refused, nothing more recorded)."""

    label: str

    def run(self, episodes: Sequence[Episode], url: str, token: str,
            cut: Callable[[int], None]) -> list[Outcome]: ...

    def close(self) -> None: ...


class ServedRollout:
    """`generate` whose episodes are conversations a `runner` holds with `engine` served on a loopback endpoint
    (not owned: `close` stops the server and the runner). `max_total_tokens` cuts a longer episode's row there."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, runner: Runner,
                 max_turns: int = 1_000_000, max_total_tokens: int | None = None, window_s: float = 0.02,
                 tool_format: str = "auto") -> None:
        self.engine, self.tokenizer, self.runner = engine, tokenizer, runner
        self.max_turns, self.max_total_tokens = max_turns, max_total_tokens
        self.token = secrets.token_urlsafe(32)
        self.server = ChatServer(engine, tokenizer, access=Access(self.token, rate_per_s=None), window_s=window_s,
                                 tool_format=tool_format)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def close(self) -> None:
        try:
            self.runner.close()
        finally:
            self.server.close()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        episodes = [Episode(uuid.uuid4().hex, SessionSpec(p, g, j, params, self.max_turns))
                    for g, p in enumerate(prompts) for j in range(params.group_size)]
        for e in episodes:
            self.server.open_session(e.session_id, e.spec)
        cut: dict[int, Session] = {}  # sessions of episodes that timed out, closed the moment they did

        def on_timeout(i: int) -> None:
            cut[i] = self.server.abandon(episodes[i].session_id)

        outcomes = self.runner.run(episodes, self.server.url, self.token, on_timeout)
        samples = [self._sample(cut[i] if i in cut else self.server.close_session(e.session_id), outcome)
                   for i, (e, outcome) in enumerate(zip(episodes, outcomes))]
        statuses = [o.status for o in outcomes]
        failed = {k: statuses.count(k) for k in ("error", "timeout") if k in statuses}
        if failed:
            log.warning("%s: %s of %d episodes ended early (ended with what they had, finish reason abort)",
                        self.runner.label, ", ".join(f"{n} {k}" for k, n in failed.items()), len(episodes))
        return build_batch(samples, self.tokenizer, self.pad_id, self.engine.policy_version)

    def _sample(self, session: Session, outcome: Outcome) -> Sample:
        spec = session.spec
        over = self.max_total_tokens is not None and len(session.tokens) > self.max_total_tokens
        truncation = "token_budget" if over else session.truncation
        meta = {**spec.prompt.meta, **outcome.meta, "turns": session.turns, "truncation": truncation,
                "agent_error": float(outcome.status == "error"), "agent_timeout": float(outcome.status == "timeout")}
        finish = "length" if truncation else "abort" if outcome.status != "ok" else session.finish or "abort"
        if not session.prompt_ids:  # no turn was served: the prompt alone, nothing to train on
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id
            return Sample(Prompt(spec.prompt.prompt_id, spec.prompt.text, spec.prompt.token_ids, meta), spec.group,
                          (eos,), (0.0,), "abort", (False,))
        text = text_of(self.tokenizer, session.prompt_ids, skip_special=False)
        sample = session.tokens.sample(Prompt(spec.prompt.prompt_id, text, session.prompt_ids, meta), spec.group,
                                       finish)
        if over:  # the budget's first tokens, exactly as served (the rest is dropped, never re-tokenised)
            n = self.max_total_tokens
            sample = dataclasses.replace(sample, token_ids=sample.token_ids[:n], logprobs=sample.logprobs[:n],
                                         trained=None if sample.trained is None else sample.trained[:n])
        return sample


class AgentRunner:
    """The user's agent `run(client: openai.OpenAI, question, fields)`, one thread per episode, `concurrency` at a
    time, each with its own client whose `X-Rlpost-Session` header names its episode."""

    label = "openai agent"

    def __init__(self, agent: Agent, concurrency: int = 16, timeout_s: float = 120.0) -> None:
        self.agent, self.concurrency, self.timeout_s = agent, concurrency, timeout_s

    def run(self, episodes: Sequence[Episode], url: str, token: str, cut: Callable[[int], None]) -> list[Outcome]:
        calls = [self._call(url, token, e) for e in episodes]
        return [Outcome(s) for s in run_all(calls, self.concurrency, self.timeout_s, cut)]

    def _call(self, url: str, token: str, episode: Episode) -> Callable[[], None]:
        def call() -> None:
            client = openai_client(url, token, episode.session_id, self.timeout_s)
            try:
                fields = dict(episode.spec.prompt.meta)
                self.agent(client, str(fields.get("question", episode.spec.prompt.text)), fields)
            finally:
                client.close()

        return call

    def close(self) -> None:
        pass


class EndpointRollout(ServedRollout):
    """`generate` that runs the user's OpenAI-client agent over `engine` (not owned: `close` stops the server)."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, agent: Agent, concurrency: int = 16,
                 timeout_s: float = 120.0, max_turns: int = 1_000_000, window_s: float = 0.02,
                 max_total_tokens: int | None = None, tool_format: str = "auto") -> None:
        super().__init__(engine, tokenizer, AgentRunner(agent, concurrency, timeout_s), max_turns, max_total_tokens,
                         window_s, tool_format)


def openai_client(base_url: str, api_key: str, session_id: str, timeout_s: float) -> openai.OpenAI:
    """An OpenAI client for one episode (`openai` is optional: rl/openai_api.py)."""
    openai = openai_module("agent.openai_agent")
    return openai.OpenAI(base_url=base_url, api_key=api_key, default_headers={SESSION_HEADER: session_id},
                         max_retries=0, timeout=timeout_s)


def async_openai_client(base_url: str, api_key: str, session_id: str, timeout_s: float) -> openai.AsyncOpenAI:
    """The async client of one episode (for runners on an event loop, e.g. verifiers environments)."""
    openai = openai_module("agent.verifiers")
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, default_headers={SESSION_HEADER: session_id},
                              max_retries=0, timeout=timeout_s)


def run_all(calls: Sequence[Callable[[], None]], concurrency: int, timeout_s: float,
            on_timeout: Callable[[int], None] = lambda i: None) -> list[str]:
    """Run `calls`, `concurrency` at a time, each on a daemon thread; per call "ok", "error" (it raised) or
    "timeout" (it ran past `timeout_s`: it is left running, `on_timeout(i)` cuts it off, its slot is freed)."""
    done: dict[int, str] = {}
    changed = threading.Condition()

    def work(i: int) -> None:
        try:
            calls[i]()
            result = "ok"
        except Exception as exc:  # noqa: BLE001 - the user's agent failing is contained and counted
            log.warning("openai agent: episode %d raised %s: %s", i, type(exc).__name__, exc)
            result = "error"
        with changed:
            done[i] = result
            changed.notify_all()

    outcomes: dict[int, str] = {}
    running: dict[int, float] = {}
    with changed:
        while len(outcomes) < len(calls):
            while len(outcomes) + len(running) < len(calls) and len(running) < concurrency:
                i = len(outcomes) + len(running)
                running[i] = time.monotonic()
                threading.Thread(target=work, args=(i,), name=f"agent-{i}", daemon=True).start()
            for i, started in list(running.items()):
                if i in done or time.monotonic() - started >= timeout_s:
                    outcomes[i] = done.get(i, "timeout")
                    del running[i]
                    if outcomes[i] == "timeout":
                        on_timeout(i)
            if running:
                changed.wait(timeout=max(0.0, min(s + timeout_s for s in running.values()) - time.monotonic()))
    return [outcomes[i] for i in range(len(calls))]
