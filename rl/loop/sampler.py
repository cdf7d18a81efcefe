"""Which prompts each step trains on: seeded epoch permutations with a resumable cursor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rl.batch import RolloutBatch
from rl.types import Prompt

if TYPE_CHECKING:
    from rl.config.job import JobConfig


class Curriculum(Protocol):
    """What a CURRICULA entry builds (e.g. envs.curriculum.PCLValueModel): it keeps `count` of a candidate pool,
    learns from each scored batch, and checkpoints its own state (the checkpoint's curriculum.pt)."""

    def select(self, pool: Sequence[Prompt], count: int) -> tuple[list[Prompt], dict[str, float]]: ...

    def update(self, batch: RolloutBatch) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class PromptSampler:
    """Walks seeded permutations of the train prompts; `state_dict()` makes resume exact."""

    curriculum: Curriculum | None = None
    """Uniform sampling has no curriculum."""

    def __init__(self, prompts: Sequence[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("the env produced no training prompts")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(len(self.prompts), generator=gen).tolist()

    def next(self, count: int) -> list[Prompt]:
        chosen: list[Prompt] = []
        while len(chosen) < count:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            chosen.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)

    def last_metrics(self) -> dict[str, float]:
        """Metrics of the latest `next` call (none for uniform sampling)."""
        return {}


class CurriculumSampler:
    """A curriculum on top of the uniform sampler: each `next(m)` draws `pool_factor * m` candidates from the
    seeded permutations (so the epoch cursor counts candidates, selected or not) and lets the curriculum keep m.

    The curriculum (a `Curriculum`, e.g. envs.curriculum.PCLValueModel) selects, learns and checkpoints.
    """

    curriculum: Curriculum

    def __init__(self, uniform: PromptSampler, curriculum: Curriculum, pool_factor: int) -> None:
        self.uniform, self.curriculum, self.pool_factor = uniform, curriculum, pool_factor
        self._metrics: dict[str, float] = {}

    def next(self, count: int) -> list[Prompt]:
        pool = self.uniform.next(count * self.pool_factor)
        chosen, self._metrics = self.curriculum.select(pool, count)
        return chosen

    def last_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return self.uniform.state_dict()  # the value model's tensors travel in the checkpoint's curriculum.pt

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.uniform.load_state_dict(state)


def build_sampler(job: JobConfig, prompts: Sequence[Prompt], model_dir: str) -> PromptSampler | CurriculumSampler:
    """`curriculum: null` samples uniformly; a named curriculum (rl.registries.CURRICULA) selects from a pool."""
    uniform = PromptSampler(prompts, job.seed)
    if job.curriculum is None:
        return uniform
    from rl.registries import CURRICULA

    curriculum = CURRICULA.get(job.curriculum.name)(job.curriculum, model_dir, job.model.dtype, job.seed)
    return CurriculumSampler(uniform, curriculum, job.curriculum.pool_factor)
