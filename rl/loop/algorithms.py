"""What `algorithm.name` changes in the loop: how a step samples and how advantages are computed.

    recipe = ALGORITHMS.get(job.algorithm.name)
    params = recipe.sampling_params(job, params)     # e.g. GRPO-MA's two-stage sampling spec
    batch, metrics = recipe.advantages(job, batch)   # [N] or [N, T] advantages (+ metrics)

The maths lives in trainers/ (advantages.py, grpo_ma.py); this module only wires it to the batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import torch

from rl.batch import RolloutBatch
from rl.config.algorithm import AlgorithmConfig, GRPOMAAlgorithm
from rl.registries import ADVANTAGES, ALGORITHMS
from rl.types import MultiAnswerSpec, SamplingParams

if TYPE_CHECKING:
    from collections.abc import Mapping

    from rl.config.job import JobConfig
    from trainers.grpo_ma import Layout


SectionT = TypeVar("SectionT", AlgorithmConfig, GRPOMAAlgorithm)


def section_of(job: JobConfig, variant: type[SectionT]) -> SectionT:
    """The job's `algorithm` section as the variant of the recipe it selected (ALGORITHMS is keyed by its name)."""
    algorithm = job.algorithm
    if not isinstance(algorithm, variant):
        raise TypeError(f"algorithm {algorithm.name!r} is not a {variant.__name__} section")
    return algorithm


def rewards_of(batch: RolloutBatch) -> torch.Tensor:
    """The batch's rewards: advantages are computed from a scored batch (steps.score runs first)."""
    assert batch.rewards is not None, "advantages of an unscored batch"
    return batch.rewards


class Recipe(Protocol):
    """What an ALGORITHMS entry provides (a class of static methods)."""

    @staticmethod
    def sampling_params(job: JobConfig, params: SamplingParams) -> SamplingParams: ...

    @staticmethod
    def advantages(job: JobConfig, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]: ...


@ALGORITHMS.register("grpo")
class GRPOFamily:
    """`name: grpo`: one completion per sample, advantages from `algorithm.advantage` (one per row)."""

    @staticmethod
    def sampling_params(job: JobConfig, params: SamplingParams) -> SamplingParams:
        return params

    @staticmethod
    def advantages(job: JobConfig, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
        cfg = section_of(job, AlgorithmConfig).advantage
        return batch.with_advantages(ADVANTAGES.entry_for(cfg)(rewards_of(batch), batch.group_ids, cfg)), {}


@ALGORITHMS.register("grpo_ma")
class GRPOMA:
    """`name: grpo_ma` (arXiv 2509.24494): K thoughts x M answers per prompt (rollout/multi_answer.py),
    per-token advantages for thought and answer tokens (trainers/grpo_ma.py)."""

    @staticmethod
    def sampling_params(job: JobConfig, params: SamplingParams) -> SamplingParams:
        a = section_of(job, GRPOMAAlgorithm)
        spec = MultiAnswerSpec(answers_per_thought=a.answers_per_thought, delimiter=a.thought_delimiter,
                               answer_max_new_tokens=a.answer_max_new_tokens)
        return dataclasses.replace(params, group_size=a.thoughts, multi_answer=spec)

    @staticmethod
    def advantages(job: JobConfig, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
        from trainers import grpo_ma

        a, rewards = section_of(job, GRPOMAAlgorithm), rewards_of(batch)
        layout = layout_of(batch)
        adv = grpo_ma.per_token_advantages(rewards, batch.loss_mask, layout, a.thoughts,
                                           a.answers_per_thought, a.answer_adv_scope, a.eps)  # [N, T]
        metrics = grpo_ma.diagnostics(rewards, layout, a.thoughts, a.answers_per_thought, a.eps)
        return batch.with_advantages(adv), metrics


def layout_of(batch: RolloutBatch) -> Layout:
    """The GRPO-MA segment layout recorded by the two-stage sampler in each row's `sample_meta`."""
    from rollout.multi_answer import META_KEY
    from trainers.grpo_ma import Layout

    # each row's record, a mapping written by the two-stage sampler (rollout/multi_answer.py)
    meta = [cast("Mapping[str, object]", m[META_KEY]) for m in batch.sample_meta]
    return Layout(prompt_lengths=batch.prompt_lengths,
                  thought_tokens=torch.tensor([m["thought_tokens"] for m in meta], dtype=torch.long),
                  thought_rows=torch.tensor([m["answer"] == 0 for m in meta], dtype=torch.bool),
                  complete=torch.tensor([bool(m["complete"]) for m in meta], dtype=torch.bool))
