"""The job file's top level: model, adapter, trainer, cluster, logging, evaluation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from rl.config.adapters import AdapterConfig
from rl.config.agent import AgentConfig
from rl.config.algorithm import AlgorithmConfig, AnyAlgorithmConfig, resolve_correction_level
from rl.config.base import Resources, Section
from rl.config.curriculum import CurriculumConfig
from rl.config.data import EnvConfig
from rl.config.rewards import AnyRewardConfig, ShapingConfig
from rl.config.rollout import RolloutConfig
from rl.config.swarm import SwarmConfig


class ModelConfig(Section):
    """The policy's starting weights."""

    path: str = "tiny-llama"
    """A built-in alias (`smollm2-135m-instruct`, `tiny-llama`), a local directory, or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str | None = None
    """Where aliases are prepared and cached; null = $RLPOST_CACHE or ~/.cache/rlpost."""


class TrainerConfig(Section):
    """The learner and the schedule of the run."""

    lr: float = Field(default=1e-5, gt=0)
    max_steps: int = Field(default=50, ge=1)
    """Training steps (one rollout batch each)."""
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(default=1.0, gt=0)
    ppo_epochs: int = Field(default=1, ge=1)
    """Passes over each rollout batch."""
    mini_batches: int = Field(default=1, ge=1)
    """Optimizer steps per pass (the batch is split by whole groups)."""
    micro_batch_tokens: int = Field(default=8192, ge=1)
    """Token budget per forward/backward; micro-batches are packed up to it."""
    logprob_chunk_tokens: int = Field(default=1024, ge=1)
    """Positions whose logits are materialised at once when computing logprobs and entropy."""
    gradient_checkpointing: bool = False
    shared_prefix: bool = False
    """Prefix Grouper (ALGORITHMS.md §4): encode each group's shared prompt once, each completion attending
    to [prompt; itself]; same logprobs and gradients as the padded forward, less compute for long prompts.
    Needs sdpa or eager attention and full (not sliding-window) attention."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every_steps: int = Field(default=10, ge=0)
    """0 disables periodic checkpoints (the last step is always saved)."""
    keep_last: int = Field(default=3, ge=1)
    eval_every_steps: int = Field(default=0, ge=0)
    """0 disables periodic evaluation."""
    eval_before_train: bool = False
    mode: Literal["sync", "async"] = "sync"
    """`async` generates step n+1 while step n trains."""
    max_staleness: int = Field(default=1, ge=0)
    """Async: samples more than this many policy versions old are dropped."""
    max_nonfinite_steps: int = Field(default=3, ge=1)
    """Consecutive non-finite losses/gradients tolerated (each skipped) before the run stops."""


class ClusterSection(Section):
    """Keys every placement has: the learner's ranks and the limit on their collectives."""

    learners: int = Field(default=1, ge=1)
    """Learner ranks: one torch.distributed group (gloo on CPU, NCCL on CUDA) training one FSDP2-sharded policy;
    each rank takes whole groups of every batch. `local` starts them as processes on this machine; under
    `torchrun`/`srun` (RANK and WORLD_SIZE set) it must equal WORLD_SIZE; `ray` places them as actors."""
    collective_timeout_s: float = Field(default=600.0, gt=0)
    """Limit on every collective between ranks (and on the weight-sync group): a dead or hung rank ends the
    run with a clear message instead of a hang; the run directory stays resumable."""


class LocalCluster(ClusterSection):
    """Everything on this machine: the driver is learner rank 0 (with the rollout engine); ranks 1..N-1 are
    processes it starts, or the other processes of a torchrun/srun launch."""

    name: Literal["local"] = "local"


class ClusterResources(Section):
    """Per-actor resources: `learner` for each learner rank, `rollout` for each rollout worker."""

    learner: Resources = Field(default_factory=Resources)
    rollout: Resources = Field(default_factory=Resources)


class WeightSyncConfig(Section):
    """How weights travel from the learner to the rollout workers (Ray actors)."""

    transport: Literal["collective", "object_store"] = "collective"
    """`collective`: a torch.distributed group of learner rank 0 and the workers (NCCL on GPU, gloo on CPU),
    tensors broadcast in size-bounded buckets; `object_store`: pickled through Ray (the fallback)."""
    bucket_mib: int = Field(default=256, ge=1)
    """Largest bucket sent at once: bounds the extra memory a sync needs on both sides."""
    verify: bool = True
    """After every sync, check the engine's weights against what was sent (per-bucket checksums on both
    sides); a mismatch stops the run naming the tensor."""


class RayCluster(ClusterSection):
    """Rollout workers and learner ranks as Ray actors (learner ranks packed in one placement group)."""

    name: Literal["ray"] = "ray"
    rollout_workers: int = Field(default=1, ge=1)
    address: str | None = None
    """An existing cluster (`auto` or host:port); null starts a local one."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of the local cluster; null = all."""
    num_gpus: int | None = Field(default=None, ge=0)
    """GPUs of the local cluster; null = what Ray detects (logical GPUs can be declared for placement tests)."""
    call_timeout_s: float = Field(default=900.0, gt=0)
    """Limit on every remote call; a call that exceeds it is treated as a dead worker."""
    resources: ClusterResources = Field(default_factory=ClusterResources)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)


ClusterConfig = Annotated[LocalCluster | RayCluster, Field(discriminator="name")]


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    """`online` needs WANDB_API_KEY; without a key it falls back to offline and says so."""
    project: str = "rlpost"
    entity: str | None = None


class LoggingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    progress: bool = True
    """Rich progress bar with ETA and key metrics."""


class EvalConfig(Section):
    """Held-out evaluation."""

    num_prompts: int = Field(default=200, ge=1)
    """Test prompts scored (at most the env's test split)."""
    samples: int = Field(default=1, ge=1)
    """Sampled completions per prompt, N (besides the greedy one; 1 = greedy only). pass@k is estimated from
    all N (the unbiased estimator of Chen et al. 2021), so pass@k for k < N has less variance than k samples."""
    k: list[Annotated[int, Field(ge=1)]] | None = None
    """The k's of the pass@k reported (pass@1 always); each k <= samples. null = 1, 2, 4, ... below samples,
    and samples itself."""
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    """null = rollout.max_new_tokens."""

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvalConfig:
        if self.k and (self.samples < 2 or max(self.k) > self.samples):
            raise ValueError(f"eval.k={self.k} needs at least {max(2, max(self.k))} sampled completions per "
                             f"prompt, but eval.samples={self.samples}; raise eval.samples (rl eval --samples N) "
                             "or ask only for k <= samples")
        return self


class JobConfig(Section):
    """A complete RL job."""

    name: str = "job"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig | None = None
    """null = full fine-tuning."""
    env: EnvConfig = Field(default_factory=lambda: {"name": "arithmetic"})  # type: ignore[assignment]
    rewards: list[AnyRewardConfig] = Field(default_factory=lambda: [{"name": "math_answer"}])  # type: ignore[arg-type]
    shaping: ShapingConfig = Field(default_factory=ShapingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig | None = None
    """Prompt selection, e.g. {name: pcl, pool_factor: 4, target: 0.5}; null = uniform (seeded permutations)."""
    algorithm: AnyAlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """`name: grpo` (the GRPO family) or `name: grpo_ma` (multi-answer, its own keys)."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    cluster: ClusterConfig = Field(default_factory=LocalCluster)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run_dir: str | None = None
    """null = runs/<name>."""
    swarm: SwarmConfig | None = None
    """SAPO: share rollouts with a swarm of nodes and train on I local + J external ones; null = off."""
    agent: AgentConfig | None = None
    """Multi-turn episodes with tools (rl/config/agent.py); null = one completion per sample."""

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if not self.rewards:
            raise ValueError("rewards: give at least one reward")
        if self.rollout.vllm.sleep_between_steps and self.trainer.mode == "async":
            raise ValueError("rollout.vllm.sleep_between_steps needs trainer.mode: sync (async keeps generating)")
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"rewards: two rewards share a name ({labels}); metrics would collide")
        return self

    @model_validator(mode="after")
    def _par_refresh_fits(self) -> JobConfig:
        if self.shaping.par_refresh_steps and self.trainer.mode == "async":
            raise ValueError("shaping.par_refresh_steps regenerates PAR's references between steps, which async mode "
                             "never has (it is always generating); use trainer.mode: sync or par_refresh_steps: 0")
        return self

    @model_validator(mode="after")
    def _episodes_fit(self) -> JobConfig:
        if self.agent is not None and self.algorithm.name == "grpo_ma":
            raise ValueError("agent (multi-turn episodes) with algorithm: grpo_ma is not supported: GRPO-MA samples "
                             "thoughts then answers, a turn structure of its own; use algorithm: grpo")
        return self

    @model_validator(mode="after")
    def _shardable(self) -> JobConfig:
        if self.cluster.learners > 1 and self.adapter is None and self.algorithm.kl.coef > 0:
            raise ValueError(f"algorithm.kl.coef={self.algorithm.kl.coef} with full fine-tuning needs a frozen copy of "
                             f"the policy as the reference, which is not sharded over cluster.learners="
                             f"{self.cluster.learners} ranks yet; use an adapter (its reference is the adapter "
                             "switched off), kl.coef=0, or cluster.learners=1")
        return self

    @model_validator(mode="after")
    def _swarm_fits(self) -> JobConfig:
        if self.swarm is not None and self.swarm.local > self.rollout.prompts_per_step:
            raise ValueError(f"swarm.local={self.swarm.local} exceeds rollout.prompts_per_step="
                             f"{self.rollout.prompts_per_step} (the local groups generated per step); lower it")
        return self

    @model_validator(mode="after")
    def _resolve_algorithm(self) -> JobConfig:
        """Write out the algorithm keys that depend on other sections (`correction.level: auto`, Dr.GRPO's
        C = null), so RUN_DIR/config.yaml shows what runs and a resume validates to the same job."""
        algo = self.algorithm
        level = resolve_correction_level(algo.correction.level, self.sampler_is_learner, algo.loss)
        update: dict = {"correction": algo.correction.model_copy(update={"level": level})}
        if algo.aggregation.name == "constant" and algo.aggregation.max_length is None:
            update["aggregation"] = algo.aggregation.model_copy(update={"max_length": self.rollout.max_new_tokens})
        # Sections are frozen and an after-validator must return self: set the derived section in place.
        object.__setattr__(self, "algorithm", algo.model_copy(update=update))
        return self

    @property
    def sampler_is_learner(self) -> bool:
        """The local transformers engine samples with the learner's own model in sync mode (no copy, no
        sync): the sampler's log-probs are the learner's. Async, Ray workers, vLLM and a sharded (N-rank) learner
        sample from copies."""
        return (self.cluster.name == "local" and self.cluster.learners == 1 and self.rollout.backend == "hf"
                and self.trainer.mode == "sync")

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"
