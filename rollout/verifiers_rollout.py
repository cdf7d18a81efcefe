"""`verifiers` environments through rlpost's engines: their rollouts talk to the policy on the chat endpoint.

`agent: {verifiers: {env: my-env, kwargs: {...}}}` loads the environment as `vf.load_environment(env, **kwargs)`
does (an installed module exposing `load_environment`; or a `.py` file defining it). What a user of verifiers +
prime-rl expects, the environment is the task:

- **Prompts** come from the environment's own dataset (`VerifiersPrompts`): its `dataset` is the train split, its
  `eval_dataset` the test split (`rl eval`), falling back to the train rows as verifiers itself does. Each row
  travels in the prompt's meta (`vf_input`: prompt messages, answer, info, task, example_id); `answer` is also a
  field of its own. The job's `env:` is not used for prompts.
- **Episodes** are the environment's own `rollout(input, client, model, sampling_args)` (SingleTurnEnv,
  MultiTurnEnv, ToolEnv, ...), `group_size` per prompt, `concurrency` at a time on one event loop, each with its own
  `AsyncOpenAI` client on the worker's loopback endpoint (rollout/endpoint_rollout.ServedRollout: sessions, seeds,
  time limits, rows of exactly the served tokens; weights follow the learner). The model name is `rlpost`; the
  environment's `sampling_args` are sent (a temperature other than the job's is refused by the endpoint).
- **Rewards**: the `group_size` episodes of a prompt are scored together by the environment's rubric
  (`rubric.score_group`, so group-level reward functions work too); its weighted reward lands in the row's meta as
  `vf_reward` and each reward function's score in `vf_metrics`. The built-in reward `verifiers`
  (`rewards: [{name: verifiers}]`, kwarg `metric` for one function's score) reads them, so weights, shaping and
  metrics work as for any reward. An episode that timed out or raised outside the environment scores 0.

This module is the one place rlpost imports `verifiers` (an optional dependency: the `verifiers` extra).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.tool_format import render
from rl.types import Prompt, RolloutEngine
from rollout.endpoint_rollout import Episode, Outcome, ServedRollout, async_openai_client

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.agent import VerifiersConfig

log = logging.getLogger(__name__)
MODEL = "rlpost"


def load_env(env: str, kwargs: Mapping[str, object]) -> object:
    """The verifiers environment `env` (a module name / env id, or a .py file) built with `kwargs`."""
    try:
        import verifiers as vf
    except ImportError:
        raise UserError("agent.verifiers needs the `verifiers` package; install rlpost's `verifiers` extra "
                        "(`pip install -e '.[verifiers]'`).") from None
    if env.endswith(".py"):
        from rl.plugins import load_object

        build = load_object(f"{env}:load_environment", "verifiers environment")
        loaded = build(**kwargs)  # type: ignore[operator]
    else:
        loaded = vf.load_environment(env, **kwargs)
    if not isinstance(loaded, vf.Environment):
        raise UserError(f"verifiers environment {env!r}: load_environment returned {type(loaded).__name__}, not a "
                        "verifiers Environment (vf.SingleTurnEnv, vf.MultiTurnEnv, vf.ToolEnv, ...).")
    return loaded


class VerifiersPrompts:
    """The job's prompts from the environment's dataset (an `rl.types.Env`: train_prompts / test_prompts)."""

    def __init__(self, cfg: VerifiersConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        env = load_env(cfg.env, cfg.kwargs)
        train = env.get_dataset()  # type: ignore[attr-defined]
        test = env.get_eval_dataset()  # type: ignore[attr-defined]  # verifiers' own fallback: the train rows
        self._train = [_prompt(tokenizer, cfg.env, "train", row) for row in train]
        self._test = [_prompt(tokenizer, cfg.env, "eval", row) for row in test]

    def train_prompts(self) -> list[Prompt]:
        return self._train

    def test_prompts(self) -> list[Prompt]:
        return self._test


def _prompt(tokenizer: PreTrainedTokenizerBase, env: str, split: str, row: Mapping[str, object]) -> Prompt:
    messages = row["prompt"]
    if not isinstance(messages, list):  # completion-style envs (a plain string prompt) are not served as chat
        raise UserError(f"verifiers environment {env!r}: its prompts are not chat messages; rlpost serves chat "
                        "environments (message_type 'chat').")
    vf_input = {k: row[k] for k in ("prompt", "answer", "info", "task", "example_id") if k in row}
    text = render(tokenizer, [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages])
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    name = Path(env).stem if env.endswith(".py") else env  # ids stay the same wherever the file lies
    return Prompt(f"vf:{name}:{split}:{row.get('example_id')}", text, ids,
                  {"answer": row.get("answer"), "vf_input": vf_input})


class VerifiersRunner:
    """Runs the episodes as the environment's own rollouts on one event loop (its own thread, kept for the run:
    an environment's async resources stay on the loop that made them), and scores each prompt's group."""

    label = "verifiers environment"

    def __init__(self, env: object, concurrency: int = 16, timeout_s: float = 120.0) -> None:
        self.env, self.concurrency, self.timeout_s = env, concurrency, timeout_s
        self._start_loop()

    def _start_loop(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="verifiers-loop", daemon=True)
        self.thread.start()

    def run(self, episodes: Sequence[Episode], url: str, token: str, cut: Callable[[int], None]) -> list[Outcome]:
        done: dict[int, tuple[Outcome, object | None]] = {}
        future = asyncio.run_coroutine_threadsafe(self._run(episodes, url, token, cut, done), self.loop)
        waves = -(-len(episodes) // self.concurrency)  # each wave of episodes within timeout_s, then the scoring
        try:
            return future.result(timeout=self.timeout_s * (waves + 1))
        except concurrent.futures.TimeoutError:
            # Only a synchronous call that blocks the loop (the env's own code, e.g. a sync tool that hangs) gets
            # here: asyncio cannot cut it. The step ends with what it has; the next one gets a fresh loop (the
            # blocked thread is left behind, a daemon).
            log.warning("verifiers environment: a synchronous call blocked the event loop past the episodes' time "
                        "limit; %d of %d episodes cut off (finish reason abort)", len(episodes) - len(done),
                        len(episodes))
            for i in range(len(episodes)):
                if i not in done:
                    cut(i)
            self._start_loop()
            return [done[i][0] if i in done else Outcome("timeout", {"vf_reward": 0.0}) for i in range(len(episodes))]
        finally:
            for outcome, _ in done.values():
                outcome.meta.setdefault("vf_reward", 0.0)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _run(self, episodes: Sequence[Episode], url: str, token: str, cut: Callable[[int], None],
                   done: dict[int, tuple[Outcome, object | None]]) -> list[Outcome]:
        slots = asyncio.Semaphore(self.concurrency)
        await asyncio.gather(*(self._episode(i, e, url, token, cut, slots, done) for i, e in enumerate(episodes)))
        groups: dict[int, list[tuple[Outcome, object]]] = {}
        for i, e in enumerate(episodes):
            outcome, state = done[i]
            if state is not None:
                groups.setdefault(e.spec.group, []).append((outcome, state))
        for members in groups.values():
            await self._score(members)
        return [done[i][0] for i in range(len(episodes))]

    async def _episode(self, i: int, episode: Episode, url: str, token: str, cut: Callable[[int], None],
                       slots: asyncio.Semaphore, done: dict[int, tuple[Outcome, object | None]]) -> None:
        done[i] = await self._rollout(i, episode, url, token, cut, slots)

    async def _rollout(self, i: int, episode: Episode, url: str, token: str, cut: Callable[[int], None],
                       slots: asyncio.Semaphore) -> tuple[Outcome, object | None]:
        import verifiers as vf

        inputs = dict(episode.spec.prompt.meta["vf_input"])
        args = {k: v for k, v in self.env.sampling_args.items() if k != "n"}  # type: ignore[attr-defined]
        async with slots:
            client = vf.OpenAIChatCompletionsClient(async_openai_client(url, token, episode.session_id,
                                                                        self.timeout_s))
            try:
                state = await asyncio.wait_for(self.env.rollout(inputs, client, MODEL, args),  # type: ignore[attr-defined]
                                               self.timeout_s)
            except asyncio.TimeoutError:
                cut(i)
                return Outcome("timeout"), None
            except Exception as exc:  # noqa: BLE001 - an environment failing is contained and counted
                log.warning("verifiers environment: episode %d raised %s: %s", i, type(exc).__name__, exc)
                return Outcome("error"), None
            finally:
                await client.close()
        if state.get("error") is not None:  # verifiers ended it on an error of its own (e.g. an empty reply)
            log.warning("verifiers environment: episode %d ended on %r", i, state["error"])
        return Outcome("error" if state.get("error") is not None else "ok"), state

    async def _score(self, members: Sequence[tuple[Outcome, object]]) -> None:
        rubric = self.env.rubric  # type: ignore[attr-defined]
        states = [state for _, state in members]
        try:
            await rubric.score_group(states)
        except Exception as exc:  # noqa: BLE001 - a failing rubric scores its group 0, the run goes on
            log.warning("verifiers environment: the rubric raised %s: %s", type(exc).__name__, exc)
            return  # its episodes score 0 (run's default)
        for outcome, state in members:
            outcome.meta["vf_reward"] = float(state.get("reward") or 0.0)  # type: ignore[attr-defined]
            metrics = state.get("metrics") or {}  # type: ignore[attr-defined]
            outcome.meta["vf_metrics"] = {str(k): float(v) for k, v in metrics.items()}
            await rubric.cleanup(state)


class VerifiersRollout(ServedRollout):
    """`generate` over `engine` whose episodes are the environment's rollouts (rl/loop/worker.py builds it)."""

    def __init__(self, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, cfg: VerifiersConfig,
                 max_turns: int = 1_000_000, max_total_tokens: int | None = None, tool_format: str = "auto") -> None:
        runner = VerifiersRunner(load_env(cfg.env, cfg.kwargs), cfg.concurrency, cfg.timeout_s)
        super().__init__(engine, tokenizer, runner, max_turns, max_total_tokens, tool_format=tool_format)
