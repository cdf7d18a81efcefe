"""Multi-turn episodes over any rollout engine: every live episode's next turn in one engine call.

`EpisodeRollout.generate(prompts, params)` has the engine's own signature and returns the same
`RolloutBatch` contract, so the training loop, evaluation, resume and the learners do not change: each
row is one episode, `[prompt][model turn][tool answer][model turn]...`, with `loss_mask` True exactly on
the tokens the model sampled and `sampling_logprobs` the sampler's log-probs of those tokens (0 on tool
tokens). GRPO groups are the `group_size` episodes of one prompt; rewards score the whole transcript.

Turn 1 is one `generate` call for all prompts (group_size episodes each). Every later turn is one call
for all live episodes, each a prompt of its own (its tokens so far, never re-tokenised: token-in/
token-out) with one sample, seeded from (call seed, episode, turn) so an episode does not depend on which
others are still live; vLLM batches them continuously, the hf engine in rounds. An episode ends when a
turn has no tool call (`stop`), or with `length` when its turn budget (`agent.max_turns`), its token
budget (`agent.max_total_tokens`) or the engine's prompt limit (`rollout.max_prompt_tokens`) runs out
(the row's meta says which: `truncation`; `episode_metrics` logs the fractions).

`agent.prefill` starts every episode's first turn with fixed text: its tokens are context in the row
(loss mask off) that the model continues, and the first turn the env parses is prefill + sampled tokens.
Rewards get the whole transcript as `completion`, the model's last turn as the field `final_turn` (answer
rewards score that: a number in a tool's answer is not the model's answer) and every model turn's text as
`turn_texts` (a reward can score turn by turn and combine; the loss still credits the episode as a whole).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.types import MultiTurnEnv, Prompt, SamplingParams
from rollout.engine import Sample, Transcript, build_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Generates(Protocol):
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch: ...


@dataclass
class _Episode:
    prompt: Prompt
    group: int
    env: MultiTurnEnv
    index: int  # which of its prompt's group_size episodes: seeds its later turns
    tokens: Transcript = field(default_factory=Transcript)
    turns: int = 0
    finish: str | None = None
    truncation: str = ""
    info: Mapping[str, object] = field(default_factory=dict)
    turn_ids: list[list[int]] = field(default_factory=list)  # each model turn (turn 1 with the prefill)

    @property
    def last(self) -> list[int]:
        return self.turn_ids[-1] if self.turn_ids else []

    def sample(self, texts: Sequence[str]) -> Sample:
        """The episode as a row; its meta gains `turns`, `truncation` and the env's last info (tool `calls`,
        `errors`), which reach the rewards as fields and the step's `agent/*` metrics."""
        meta = {**self.prompt.meta, **self.info, "turns": self.turns, "truncation": self.truncation,
                "final_turn": texts[-1] if texts else "", "turn_texts": list(texts)}
        return self.tokens.sample(dataclasses.replace(self.prompt, meta=meta), self.group, self.finish or "length")


def _turns(batch: RolloutBatch) -> list[tuple[list[int], list[float], str]]:
    """Each row's sampled tokens, their logprobs and finish reason (a single-turn batch: the masked span)."""
    rows = []
    for i in range(batch.num_samples):
        mask = batch.loss_mask[i]
        rows.append((batch.input_ids[i][mask].tolist(), batch.sampling_logprobs[i][mask].tolist(),
                     batch.finish_reasons[i]))
    return rows


class EpisodeRollout:
    """`generate` that runs episodes turn by turn over `inner` (an engine or the run's rollout pool)."""

    def __init__(self, inner: Generates, tokenizer: PreTrainedTokenizerBase, new_env: Callable[[], MultiTurnEnv],
                 max_turns: int, max_total_tokens: int, max_prompt_tokens: int, stop: Sequence[str] = (),
                 on_close: Callable[[], None] | None = None, prefill: str = "") -> None:
        self.inner, self.tokenizer, self.new_env, self.on_close = inner, tokenizer, new_env, on_close
        self.max_turns, self.max_total_tokens, self.max_prompt_tokens = max_turns, max_total_tokens, max_prompt_tokens
        self.stop = tuple(stop)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefill: list[int] = tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []
        if len(self.prefill) >= max_total_tokens:
            raise UserError(f"agent.prefill is {len(self.prefill)} tokens, which leaves no room in the episode's "
                            f"token budget ({max_total_tokens}): raise agent.max_total_tokens or shorten the prefill")

    def close(self) -> None:
        """Release what the episodes hold (the tools' workers); the inner engine is its owner's to close."""
        if self.on_close is not None:
            self.on_close()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        params = dataclasses.replace(params, stop=tuple(dict.fromkeys((*params.stop, *self.stop))))
        started = [dataclasses.replace(p, token_ids=tuple(p.token_ids) + tuple(self.prefill)) for p in prompts]
        first = self.inner.generate(started if self.prefill else prompts, params)
        groups = first.group_ids.tolist()
        episodes = [_Episode(prompts[g], g, self.new_env(), i - groups.index(g)) for i, g in enumerate(groups)]
        for e in episodes:
            e.env.reset(e.prompt)
            e.tokens.context(self.prefill)
        live = self._advance(episodes, _turns(first))
        while live:
            params_t = dataclasses.replace(params, group_size=1)
            batch = self.inner.generate([self._continuation(e) for e in live], params_t)
            live = self._advance(live, _turns(batch))
        texts = iter(self.tokenizer.batch_decode([t for e in episodes for t in e.turn_ids], skip_special_tokens=True))
        samples = [e.sample([next(texts) for _ in e.turn_ids]) for e in episodes]
        return build_batch(samples, self.tokenizer, self.pad_id, first.policy_version)

    def _continuation(self, e: _Episode) -> Prompt:
        # its own prompt id: the engine seeds each request from (seed, prompt_id, occurrence), so turn t of
        # episode j of a prompt has the same seed whatever else is in the call
        return Prompt(prompt_id=f"{e.prompt.prompt_id}#{e.index}#{e.turns}", text=e.prompt.text,
                      token_ids=tuple(e.prompt.token_ids) + tuple(e.tokens.ids), meta=e.prompt.meta)

    def _advance(self, episodes: Sequence[_Episode], turns: Sequence[tuple[list[int], list[float], str]]
                 ) -> list[_Episode]:
        """Append each episode's turn and its env's answer; the episodes still running."""
        live = []
        for e, (ids, lps, reason) in zip(episodes, turns):
            room = max(0, self.max_total_tokens - len(e.tokens))
            e.tokens.sampled(ids[:room], lps[:room])
            e.turn_ids.append((self.prefill if e.turns == 0 else []) + ids[:room])
            e.turns += 1
            if len(ids) > room:
                e.finish, e.truncation = "length", "token_budget"
                continue
            result = e.env.step(e.last)
            e.info = result.info
            if result.done:
                e.finish = reason if reason in ("stop", "length") else "abort"
                continue
            e.tokens.context(list(result.observation_ids)[: self.max_total_tokens - len(e.tokens)])
            e.finish, e.truncation = "length", self._out_of_room(e)
            if not e.truncation:
                e.finish = None
                live.append(e)
        return live

    def _out_of_room(self, e: _Episode) -> str:
        """Why an episode that called a tool cannot take another turn ('' when it can)."""
        if e.turns >= self.max_turns:
            return "max_turns"
        if len(e.tokens) >= self.max_total_tokens:
            return "token_budget"
        if len(e.prompt.token_ids) + len(e.tokens) > self.max_prompt_tokens:
            return "prompt_limit"
        return ""



def episode_metrics(batch: RolloutBatch) -> dict[str, float]:
    """`agent/*` means over a batch of episodes (empty for single-turn batches)."""
    metas = [m for m in batch.sample_meta if "turns" in m]
    if not metas:
        return {}
    n = len(metas)

    def mean(key: str) -> float:
        return sum(float(v) if isinstance(v := m.get(key), (int, float)) else 0.0 for m in metas) / n

    out: dict[str, float] = {"agent/turns_mean": mean("turns"), "agent/tool_calls_mean": mean("calls"),
           "agent/tool_errors_mean": mean("errors")}
    for reason in ("max_turns", "token_budget", "prompt_limit"):
        out[f"agent/truncated_{reason}_frac"] = sum(1.0 for m in metas if m.get("truncation") == reason) / n
    if any("agent_error" in m for m in metas):  # OpenAI-client agents (rollout/endpoint_rollout.py)
        out["agent/errors_frac"], out["agent/timeouts_frac"] = mean("agent_error"), mean("agent_timeout")
    return out
