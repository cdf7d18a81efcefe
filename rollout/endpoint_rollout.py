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
past `agent.max_turns` ends with `length` (truncation `max_turns`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.netauth import Access
from rl.types import Prompt, RolloutEngine, SamplingParams
from rollout.chat_session import Session, SessionSpec, text_of
from rollout.engine import Sample, build_batch
from rollout.openai_server import SESSION_HEADER, ChatServer

if TYPE_CHECKING:
    import openai
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
Agent = Callable[["openai.OpenAI", str, dict[str, object]], None]


class EndpointRollout:
    """`generate` that runs the user's OpenAI-client agent over `engine` (not owned: `close` stops the server)."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, agent: Agent, concurrency: int = 16,
                 timeout_s: float = 120.0, max_turns: int = 1_000_000, window_s: float = 0.02) -> None:
        self.engine, self.tokenizer, self.agent = engine, tokenizer, agent
        self.concurrency, self.timeout_s, self.max_turns = concurrency, timeout_s, max_turns
        self.token = secrets.token_urlsafe(32)
        self.server = ChatServer(engine, tokenizer, access=Access(self.token, rate_per_s=None), window_s=window_s)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def close(self) -> None:
        self.server.close()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        episodes = [(uuid.uuid4().hex, SessionSpec(p, g, j, params, self.max_turns))
                    for g, p in enumerate(prompts) for j in range(params.group_size)]
        for sid, spec in episodes:
            self.server.open_session(sid, spec)
        calls = [self._call(sid, spec.prompt) for sid, spec in episodes]
        cut: dict[int, Session] = {}  # sessions of agents that timed out, closed the moment they did

        def on_timeout(i: int) -> None:
            cut[i] = self.server.abandon(episodes[i][0])

        outcomes = run_all(calls, self.concurrency, self.timeout_s, on_timeout)
        samples = [self._sample(cut[i] if i in cut else self.server.close_session(sid), outcome)
                   for i, ((sid, _), outcome) in enumerate(zip(episodes, outcomes))]
        failed = {k: outcomes.count(k) for k in ("error", "timeout") if k in outcomes}
        if failed:
            log.warning("openai agent: %s of %d episodes ended early (ended with what they had, finish reason abort)",
                        ", ".join(f"{n} {k}" for k, n in failed.items()), len(episodes))
        return build_batch(samples, self.tokenizer, self.pad_id, self.engine.policy_version)

    def _call(self, session_id: str, prompt: Prompt) -> Callable[[], None]:
        def call() -> None:
            client = openai_client(self.server.url, self.token, session_id, self.timeout_s)
            try:
                fields = dict(prompt.meta)
                self.agent(client, str(fields.get("question", prompt.text)), fields)
            finally:
                client.close()

        return call

    def _sample(self, session: Session, outcome: str) -> Sample:
        spec = session.spec
        meta = {**spec.prompt.meta, "turns": session.turns, "truncation": session.truncation,
                "agent_error": float(outcome == "error"), "agent_timeout": float(outcome == "timeout")}
        finish = "length" if session.truncation else "abort" if outcome != "ok" else session.finish or "abort"
        if not session.prompt_ids:  # no turn was served: the prompt alone, nothing to train on
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id
            return Sample(Prompt(spec.prompt.prompt_id, spec.prompt.text, spec.prompt.token_ids, meta), spec.group,
                          (eos,), (0.0,), "abort", (False,))
        text = text_of(self.tokenizer, session.prompt_ids, skip_special=False)
        return session.tokens.sample(Prompt(spec.prompt.prompt_id, text, session.prompt_ids, meta), spec.group, finish)


def openai_client(base_url: str, api_key: str, session_id: str, timeout_s: float) -> openai.OpenAI:
    """An OpenAI client for one episode (the one place rlpost imports `openai`, an optional dependency)."""
    try:
        import openai
    except ImportError:
        raise UserError("agent.openai_agent needs the `openai` package; install it with `pip install openai` (or "
                        "rlpost's `agents` extra).") from None
    return openai.OpenAI(base_url=base_url, api_key=api_key, default_headers={SESSION_HEADER: session_id},
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
