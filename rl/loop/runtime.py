"""Building a run's parts from a job: model directory, tokenizer, env, prompts, scorer, placement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rl.loop.cluster import Placement, RolloutPool
from rl.loop.sampler import CurriculumSampler, PromptSampler, build_sampler
from rl.models import load_tokenizer, resolve_model
from rl.registries import CLUSTERS, ENVS
from rl.types import Env, Learner, Scorer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.job import JobConfig


@dataclass
class RunParts:
    job: JobConfig
    model_dir: str
    tokenizer: PreTrainedTokenizerBase
    env: Env
    sampler: PromptSampler | CurriculumSampler
    scorer: Scorer
    placement: Placement

    @property
    def learner(self) -> Learner:
        return self.placement.learner

    @property
    def rollout(self) -> RolloutPool:
        return self.placement.rollout

    def close(self) -> None:
        self.placement.close()
        self.scorer.close()


def build_env(job: JobConfig, tokenizer: PreTrainedTokenizerBase) -> Env:
    env_cfg = job.env
    if job.agent is not None and job.agent.verifiers is not None:  # the verifiers environment's own dataset
        from rollout.verifiers_rollout import VerifiersPrompts

        return VerifiersPrompts(job.agent.verifiers, tokenizer)
    if job.agent is not None:  # the prompts tell the model its tools (envs/tool_calls.py)
        from envs.tool_calls import with_tools_prompt
        from envs.tools import ToolBox

        tools = ToolBox.from_configs(job.agent.tools)
        try:
            system = with_tools_prompt(env_cfg.system_prompt, job.agent.system_prompt, tools.specs, tokenizer,
                                       job.agent.tool_format)
        finally:
            tools.close()
        env_cfg = env_cfg.model_copy(update={"system_prompt": system})
    return ENVS.entry_for(env_cfg)(env_cfg, tokenizer, job.seed)


def build_scorer(job: JobConfig) -> Scorer:
    """The job's rewards; under `cluster: ray` each reward model gets its own actor (rl/loop/reward_actor.py)."""
    from rewards.scoring import build_scorer as build

    if job.cluster.name == "ray":
        from rl.loop.reward_actor import placer

        return build(job.rewards, job.shaping, place=placer(job.cluster))
    return build(job.rewards, job.shaping)


def build_placement(job: JobConfig, model_dir: str) -> Placement:
    from rl.loop.learner import PolicyLearner
    from rl.loop.weights import sync_mode
    from rl.loop.worker import EngineWorker

    def make_learner() -> PolicyLearner:
        return PolicyLearner(job, model_dir)

    def make_worker(learner: PolicyLearner | None) -> EngineWorker:
        # In sync mode "shared" the local HF engine samples with the learner's own model: no copy, no sync.
        shared = learner.model if (learner is not None and sync_mode(job) == "shared") else None
        return EngineWorker(job, model_dir, shared_model=shared)

    return CLUSTERS.get(job.cluster.name)(job, make_learner, make_worker)


def build_run(job: JobConfig) -> RunParts:
    model_dir = resolve_model(job.model.path, job.model.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    env = build_env(job, tokenizer)
    sampler = build_sampler(job, env.train_prompts(), model_dir)
    scorer = build_scorer(job)
    placement = build_placement(job, model_dir)
    return RunParts(job, model_dir, tokenizer, env, sampler, scorer, placement)
