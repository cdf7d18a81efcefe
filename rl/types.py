"""Wire types and interfaces between the packages (besides `RolloutBatch`, see rl/batch.py).

`rl/` wires the packages together through these; `rollout`, `rewards`, `trainers` and `envs` import
them but never each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch

from rl.batch import RolloutBatch


@dataclass(frozen=True)
class Prompt:
    """One prompt, rendered and tokenised once by its env (token-in/token-out from here on).

    prompt_id: stable across runs with the same seed (curriculum, eval records, resume).
    text:      the rendered prompt (chat template applied) exactly as tokenised.
    token_ids: the prompt tokens the engine must consume as-is (never re-tokenised).
    meta:      fields passed to reward functions as keyword arguments (e.g. `answer`).
    """

    prompt_id: str
    text: str
    token_ids: tuple[int, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))


@dataclass(frozen=True)
class MultiAnswerSpec:
    """Two-stage sampling for GRPO-MA (rollout/multi_answer.py): `group_size` thoughts per prompt, each
    ending with `delimiter`, then `answers_per_thought` answers of at most `answer_max_new_tokens` each."""

    answers_per_thought: int
    delimiter: str
    answer_max_new_tokens: int


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one group per prompt. `seed` makes a call reproducible: each prompt's requests are
    seeded from (seed, prompt_id, occurrence), sample j of a group with that seed + j, so a prompt's samples
    do not depend on batching or sharding. `greedy=True` ignores temperature/top-p/top-k."""

    group_size: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int = 0
    greedy: bool = False
    multi_answer: MultiAnswerSpec | None = None
    """Set: sample thoughts then answers (GRPO-MA); None: one completion per sample."""


class RolloutEngine(Protocol):
    """A sampler: prompts in, a validated `RolloutBatch` out (rows grouped by prompt, in prompt order)."""

    policy_version: int

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch: ...

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> float:
        """Load full (merged) weights in place; returns seconds spent."""
        ...

    def push_lora(self, adapter_dir: str, version: int) -> float:
        """Hot-load a PEFT LoRA adapter directory for subsequent generation; returns seconds spent."""
        ...

    def close(self) -> None: ...


class Env(Protocol):
    """A task: deterministic train/test prompts (from the job seed) with reward fields in `meta`."""

    def train_prompts(self) -> Sequence[Prompt]: ...

    def test_prompts(self) -> Sequence[Prompt]: ...


@dataclass(frozen=True)
class RewardResult:
    """Scores for N samples.

    total:       [N] float, the weighted (and shaped) reward used for advantages
    components:  {label: [N] float}, each reward's own value (NaN where it returned None / failed)
    keep:        [N] bool, False for samples to drop (on_error: drop_group drops the whole group)
    errors:      {label: count} of failed calls (timeout, exception, non-finite, wrong type)
    """

    total: torch.Tensor
    components: Mapping[str, torch.Tensor]
    keep: torch.Tensor
    errors: Mapping[str, int] = field(default_factory=dict)


class Scorer(Protocol):
    def score(self, batch: RolloutBatch) -> RewardResult: ...

    def close(self) -> None: ...
