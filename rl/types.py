"""Wire types and interfaces between the packages (besides `RolloutBatch`, see rl/batch.py).

The loop (rl/loop/) wires the packages together through these; `rollout`, `rewards`, `trainers` and
`envs` import them but never each other, nor the loop.

    Env           -> Prompt                       (envs/, ENVS registry; `custom` via import_path)
    RolloutEngine -> RolloutBatch                 (rollout/)
    Scorer        -> RewardResult                 (rewards/)
    Objective                                     (trainers/, LOSSES registry; `custom` via import_path)
    Learner       -> WeightSync -> RolloutWorker  (rl/loop/: local objects and Ray handles alike)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel

from rl.batch import RolloutBatch

if TYPE_CHECKING:
    pass


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


@dataclass(frozen=True)
class StepResult:
    """What the env returns after a model turn: tokens to append (never trained on), and whether it is over."""

    observation_ids: tuple[int, ...] = ()
    done: bool = False
    info: Mapping[str, object] = field(default_factory=dict)


class MultiTurnEnv(Protocol):
    """One episode's environment (rollout/episodes.py runs it, envs/ implements it)."""

    def reset(self, prompt: Prompt) -> None:
        """Start an episode for `prompt` (clear per-episode state)."""
        ...

    def step(self, turn_ids: Sequence[int]) -> StepResult:
        """React to the tokens the model produced this turn."""
        ...


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

    def sleep(self) -> None:
        """Free accelerator memory while the learner trains (vLLM on GPU); a no-op where there is none."""
        ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class Env(Protocol):
    """A task: deterministic train/test prompts (from the job seed) with reward fields in `meta`."""

    def train_prompts(self) -> Sequence[Prompt]: ...

    def test_prompts(self) -> Sequence[Prompt]: ...


EnvFactory = Callable[..., Env]
"""What the ENVS registry holds: `factory(env_config, tokenizer, seed) -> Env` (a class works)."""


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
    def score(self, batch: RolloutBatch, shaped: bool = True) -> RewardResult:
        """Every reward of every sample; `total` is shaped (clip, PAR) unless `shaped=False` (evaluation, and
        PAR's own reference rewards)."""
        ...

    def total_spec(self) -> list[tuple[str, float]]:
        """(label, weight) of each reward in the weighted total."""
        ...

    def close(self) -> None: ...


class BatchReward(Protocol):
    """A model-backed reward (the REWARD_MODELS registry: `reward_model`, `judge`), built once from its config
    section and called on whole batches: one score per sample, or the exception that sample's scoring raised
    (its `on_error` fallback applies, as for a failing reward function)."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, object]]) -> list[float | Exception]: ...

    def close(self) -> None: ...


# ----- objectives (trainers/, the LOSSES registry) ------------------------------------------------
Stats = dict[str, torch.Tensor]
"""An objective's diagnostics: 0-dim tensors without grad (clip_frac_low, clip_frac_high, ratio_mean,
ratio_max, and any of its own), reported as `policy`/loss metrics weighted by tokens."""

ObjectiveFn = Callable[..., tuple[torch.Tensor, Stats]]
"""`fn(logp, old_logp, adv, mask, cfg, **inputs) -> (per-token loss [B, T], stats)`: logp [B, T] with grad,
old_logp [B, T] the behaviour policy's, adv [B, T], mask [B, T] float, cfg the loss's config section; `inputs`
are the row-aligned tensors its `prepare` returned, sliced to the micro-batch. Values at mask 0 are ignored."""

LossConfigT = TypeVar("LossConfigT", bound=BaseModel)


T = TypeVar("T")


class PolicyRunner(Protocol):
    """`runner(compute)` = `compute(policy)`, run where the policy's parameters are whole (trainers/sharding.py)."""

    def __call__(self, compute: Callable[[torch.nn.Module], T]) -> T: ...


@dataclass(frozen=True)
class LossContext:
    """What an objective's `prepare` may use besides the mini-batch: the policy before this step's updates
    and the trainer settings that say how to run it (never the trainer itself)."""

    model: torch.nn.Module
    device: str
    temperature: float
    """The rollout's sampling temperature; logprobs are taken at it."""
    micro_batch_tokens: int
    logprob_chunk_tokens: int
    run: PolicyRunner | None = None
    """How to run a computation on the policy: `ctx.apply(lambda policy: ...)`. With N learner ranks the policy is
    FSDP2-sharded and every pass must go through its root unit (trainers/sharding.py); `model` is still the
    policy, but only `apply` is valid on N ranks."""

    def apply(self, compute: Callable[[torch.nn.Module], T]) -> T:
        return self.run(compute) if self.run is not None else compute(self.model)


def _always(cfg: BaseModel) -> bool:
    return True


@dataclass(frozen=True)
class Objective(Generic[LossConfigT]):
    """A per-token policy objective and what the trainer must do for it; the trainer reads these fields.

    fn:                 the loss (ObjectiveFn).
    prepare:            `prepare(ctx, mini_batch, cfg) -> {name: [n] or [n, T] tensor}`, computed once per mini-batch
                        before any update of the step (without grad) and passed to `fn` as keyword inputs,
                        sliced to each micro-batch (Lp-Reg's proxy log-probs, RAPID's rewards); None: no inputs.
    needs_whole_groups: every micro-batch holds whole groups (RAPID's baseline needs all members' weights).
    needs_old_logprobs: False when the objective brings its own behaviour log-probs for this config (RAPID with
                        the sampler's): the trainer then skips recomputing pi_old.
    """

    fn: ObjectiveFn
    prepare: Callable[[LossContext, RolloutBatch, LossConfigT], Mapping[str, torch.Tensor]] | None = None
    needs_whole_groups: bool = False
    needs_old_logprobs: Callable[[LossConfigT], bool] = _always


AdvantageFn = Callable[..., torch.Tensor]
"""What the ADVANTAGES registry holds: `fn(rewards [N], group_ids [N], cfg) -> advantages [N]`; each built-in takes
its own section class (GRPOAdvantage, ...), which a Callable over a common base cannot say (parameters are
contravariant), hence `...`; the custom adapter checks the three positional parameters when it loads one."""


# ----- weight sync (learner -> rollout workers) ----------------------------------------------------
SyncMode = Literal["shared", "full", "lora"]
"""How a job's rollout side gets the learner's weights; chosen once per job (rl/loop/weights.py)."""


@dataclass(frozen=True)
class SharedModel:
    """Nothing to send: the engine samples with the learner's own model (local transformers, sync mode)."""


@dataclass(frozen=True)
class FullWeights:
    """The whole (adapter-merged) state dict, on CPU."""

    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LoraFiles:
    """The adapter in its exact PEFT-LoRA form, as the files of a PEFT adapter folder (vLLM hot-loads it)."""

    files: Mapping[str, bytes]


WeightSync = SharedModel | FullWeights | LoraFiles


# ----- the loop's two roles (local objects and Ray handles both satisfy these) ---------------------
class Learner(Protocol):
    """Owns the trainable policy: trains on scored batches and produces weights for the rollout side."""

    def train_step(self, batch: RolloutBatch) -> dict[str, float]: ...

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[N, T] no-grad logprobs of `batch`'s tokens under the current policy (0 off the loss mask)."""
        ...

    def weights(self, mode: SyncMode) -> WeightSync: ...

    def save_policy(self, checkpoint_dir: str) -> dict[str, object]:
        """Collective: every rank writes its shards into `checkpoint_dir/policy/`; returns the trainer state."""
        ...

    def load_policy(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        """Collective: load a checkpoint's policy at this number of ranks, whatever number saved it."""
        ...

    def export(self, out_dir: str) -> None: ...


class RolloutWorker(Protocol):
    """One engine: prompts in, `RolloutBatch` out, weights in from the learner."""

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch: ...

    def load_weights(self, sync: WeightSync, version: int) -> float:
        """Serve `sync` as policy `version` from now on; returns seconds spent."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...
