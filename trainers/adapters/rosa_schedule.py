"""RoSA's mask schedule, driven by the RL loop through one hook per optimizer step (ADAPTERS.md §3.2).

Timeline for `warmup_steps=N, collection_steps=K` (step = the optimizer update's 0-based index):
  steps 0..N-1      LoRA only (the sparse values are not in the forward, so they get no gradient and
                    AdamW, which skips parameters without one, leaves them at 0);
  steps N..N+K-1    LoRA keeps training; every targeted layer also accumulates its dense weight gradient
                    G = dL/dW (through a zero "probe" delta) into a CPU running mean of G² (or G);
  end of step N+K-1 per layer, Ω = top-int(d·m·n) entries of the accumulator; the sparse part is live from
                    step N+K on. With `restart=True` both adapters are then reset to their inits (the
                    paper's restart recipe, done in place), this step's update is dropped and their
                    optimizer state (AdamW's exp_avg, exp_avg_sq, step) is cleared, so the restarted
                    adapters start with fresh moments instead of the warm-up's.
The PolicyTrainer calls `before_optimizer_step(model, step)` after backward and before `optimizer.step()`; the
schedule is built on that trainer's optimizer (rl/loop/learner.py), which a restart needs.
Resuming: the masks are checkpointed with the adapter (buffers), so a resumed run past step N+K does nothing
here; a run resumed inside the collection window collects K fresh steps.
Known limit: an update the trainer skips (non-finite loss) still leaves its probe gradient, which then
counts towards the next collection step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from trainers.adapters.rosa import RosaLayer

GradAccumulation = Literal["mean_squared", "mean"]


def accumulate(running: torch.Tensor | None, grad: torch.Tensor, count: int, mode: GradAccumulation,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Running mean over collection steps of G² (`mean_squared`, the empirical diagonal Fisher) or G.

    running: mean of the first `count` terms ([m, n], on CPU, `dtype`) or None when count == 0; grad: [m, n].
    """
    term = grad.detach().float().cpu()
    term = term.square() if mode == "mean_squared" else term
    if running is None or count == 0:
        return term.to(dtype)
    return (running.float() + (term - running.float()) / (count + 1)).to(dtype)


def make_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat indices of the int(density·m·n) largest |scores| entries. scores [m, n] -> [nnz] int64."""
    k = int(density * scores.numel())
    return torch.topk(scores.float().abs().flatten(), k).indices.sort().values


def rosa_layers(model: torch.nn.Module) -> Iterator[RosaLayer]:
    return (module for module in model.modules() if isinstance(module, RosaLayer))


class RosaSchedule:
    """Warm-up LoRA, collect gradients, build masks, optionally restart: an `AdapterSchedule`."""

    def __init__(self, model: torch.nn.Module, warmup_steps: int, collection_steps: int, density: float,
                 mode: GradAccumulation = "mean_squared", restart: bool = False,
                 accumulator_dtype: torch.dtype = torch.float32, adapter: str = "default",
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        """`optimizer`: the one that steps `model`'s adapter; required with `restart` (its state is cleared)."""
        if restart and optimizer is None:
            raise ValueError("RoSA restart_after_mask must clear the restarted adapters' optimizer state: build the "
                             "schedule with the optimizer that trains the model (schedule_for(model, cfg, optimizer))")
        self.optimizer = optimizer
        self.warmup_steps, self.collection_steps, self.density = warmup_steps, collection_steps, density
        self.mode, self.restart, self.accumulator_dtype, self.adapter = mode, restart, accumulator_dtype, adapter
        self.collected = 0
        self.accumulators: dict[str, torch.Tensor] = {}
        if not self.done(model) and warmup_steps == 0:
            self._arm(model)  # step 0 already collects: its forward must see the probes

    def done(self, model: torch.nn.Module) -> bool:
        return all(layer.spa_ready(self.adapter) for layer in rosa_layers(model))

    def before_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """Advance the schedule after `step`'s backward, before `optimizer.step()`."""
        if self.done(model):
            return
        if self.accumulators or self._armed(model):
            self._collect(model)
            if self.collected >= self.collection_steps:
                self._build_masks(model)
                return
        if step + 1 >= self.warmup_steps and not self._armed(model):
            self._arm(model)

    def _armed(self, model: torch.nn.Module) -> bool:
        return any(layer.probe is not None for layer in rosa_layers(model))

    def _arm(self, model: torch.nn.Module) -> None:
        for layer in rosa_layers(model):
            layer.arm_probe()

    def _collect(self, model: torch.nn.Module) -> None:
        for name, layer in model.named_modules():
            if isinstance(layer, RosaLayer):
                self.accumulators[name] = accumulate(self.accumulators.get(name), layer.take_probe_grad(),
                                                     self.collected, self.mode, self.accumulator_dtype)
        self.collected += 1

    def _build_masks(self, model: torch.nn.Module) -> None:
        for name, layer in model.named_modules():
            if isinstance(layer, RosaLayer):
                layer.disarm_probe()
                idx = make_mask(self.accumulators.pop(name), self.density)
                layer.set_mask(self.adapter, idx.to(layer.rosa_spa_idx[self.adapter].device))
                if self.restart:
                    layer.reset_adapter(self.adapter)
                    assert self.optimizer is not None  # __init__ refuses restart without one
                    _drop_update(layer, self.optimizer)
        self.collected = 0


def _drop_update(layer: RosaLayer, optimizer: torch.optim.Optimizer) -> None:
    """After a restart: no update from the pre-restart gradient (AdamW skips a parameter without one) and no
    stale moments. The state is removed, not zeroed: the optimizer re-creates it as at its first step, which is
    right for any optimizer (zero is not every optimizer's initial state)."""
    for param in layer.parameters():
        if param.requires_grad:
            param.grad = None
            optimizer.state.pop(param, None)
