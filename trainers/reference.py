"""The reference policy for the KL term, without a second copy of the model when an adapter is used."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from rl.batch import RolloutBatch


class ReferencePolicy:
    """Reference logprobs: with an adapter, the same model with the adapter disabled (exactly the base
    model, no extra memory); for full fine-tuning, a frozen copy of the initial weights."""

    def __init__(self, model: Any) -> None:
        self.uses_adapter = hasattr(model, "disable_adapter")
        self.model = model
        self.frozen = None
        if not self.uses_adapter:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def logprobs(self, batch: RolloutBatch, compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """[N, T] reference logprobs, using `compute(batch, with_entropy)` bound to the right model."""
        with torch.no_grad():
            if self.uses_adapter:
                with self.model.disable_adapter():
                    return compute(batch, False)[0].cpu()
            original, owner = _swap(compute, self.frozen)
            try:
                return compute(batch, False)[0].cpu()
            finally:
                owner.model = original


def _swap(compute: Callable, frozen: Any) -> tuple[Any, Any]:
    owner = compute.__self__  # the PolicyTrainer whose `model` the bound method reads
    original = owner.model
    owner.model = frozen
    return original, owner
