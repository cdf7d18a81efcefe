"""The reference policy of the KL term, behind one small interface.

`PolicyTrainer` only needs reference logprobs of a batch's loss tokens. Two built-in ways to get them:
- the model carries an adapter (it has PEFT's `disable_adapter()` context manager): the reference is
  the same model with the adapter disabled, i.e. exactly the base weights, with no second copy;
- full fine-tuning: a frozen copy of the initial weights, taken when the trainer is built.
A caller with another arrangement (a remote reference, a different adapter library) passes its own
object with a `logprobs(batch)` method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Protocol

import torch

from rl.batch import RolloutBatch

# (model, batch) -> [N, T] logprobs of the batch's loss tokens under `model`, computed without grad.
LogprobFn = Callable[[torch.nn.Module, RolloutBatch], torch.Tensor]


class ReferencePolicy(Protocol):
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[N, T] reference logprobs aligned like `RolloutBatch.sampling_logprobs` (0 off the loss mask)."""
        ...


class AdapterDisabledReference:
    """The policy model itself with its adapter switched off for the duration of the call."""

    def __init__(self, model: torch.nn.Module, compute: LogprobFn) -> None:
        self.model, self.compute = model, compute

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        # torch types module attributes as Tensor | Module; default_reference picks this class only when the
        # model has PEFT's `disable_adapter` context manager
        with torch.no_grad(), self.model.disable_adapter():  # type: ignore[operator]
            return self.compute(self.model, batch)


class FrozenCopyReference:
    """A frozen copy of the model's weights at construction time (full fine-tuning)."""

    def __init__(self, model: torch.nn.Module, compute: LogprobFn) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.compute = compute

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        with torch.no_grad():
            return self.compute(self.model, batch)


def default_reference(model: torch.nn.Module, compute: LogprobFn) -> ReferencePolicy:
    """Adapter disabled when the model has PEFT's `disable_adapter`, otherwise a frozen copy."""
    kind = AdapterDisabledReference if hasattr(model, "disable_adapter") else FrozenCopyReference
    return kind(model, compute)
