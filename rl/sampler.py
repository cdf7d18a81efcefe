"""Which prompts each step trains on: seeded epoch permutations with a resumable cursor."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from rl.types import Prompt


class PromptSampler:
    """Walks seeded permutations of the train prompts; `state_dict()` makes resume exact."""

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
        chosen = []
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
