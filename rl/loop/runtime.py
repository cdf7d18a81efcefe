"""Building a run's parts from a job: model directory, tokenizer, env, prompts, scorer, placement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl.loop.cluster import Placement
from rl.models import load_tokenizer, resolve_model
from rl.registries import CLUSTERS, ENVS
from rl.loop.sampler import CurriculumSampler, PromptSampler, build_sampler
from rl.types import Env, Scorer


@dataclass
class RunParts:
    job: Any
    model_dir: str
    tokenizer: Any
    env: Env
    sampler: PromptSampler | CurriculumSampler
    scorer: Scorer
    placement: Placement

    @property
    def learner(self) -> Any:
        return self.placement.learner

    @property
    def rollout(self) -> Any:
        return self.placement.rollout

    def close(self) -> None:
        self.placement.close()
        self.scorer.close()


def build_env(job: Any, tokenizer: Any) -> Env:
    return ENVS.get(job.env.name)(job.env, tokenizer, job.seed)


def build_scorer(job: Any) -> Scorer:
    from rewards.scoring import build_scorer as build

    return build(job.rewards, job.shaping)


def shares_learner_model(job: Any) -> bool:
    """The local HF engine samples with the learner's own model in sync mode: no copy, no sync."""
    return job.sampler_is_learner


def build_placement(job: Any, model_dir: str) -> Placement:
    from rl.loop.learner import Learner
    from rl.loop.worker import RolloutWorker

    def make_learner() -> Learner:
        return Learner(job, model_dir)

    def make_worker(learner: Any) -> RolloutWorker:
        shared = learner.model if (learner is not None and shares_learner_model(job)) else None
        return RolloutWorker(job, model_dir, shared_model=shared)

    return CLUSTERS.get(job.cluster.name)(job, make_learner, make_worker)


def build_run(job: Any) -> RunParts:
    model_dir = resolve_model(job.model.path, job.model.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    env = build_env(job, tokenizer)
    sampler = build_sampler(job, env.train_prompts(), model_dir)
    scorer = build_scorer(job)
    placement = build_placement(job, model_dir)
    return RunParts(job, model_dir, tokenizer, env, sampler, scorer, placement)
