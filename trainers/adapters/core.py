"""Building, scheduling, disabling and checkpointing adapters through PEFT's tuner interface.

Each registered name maps a project config (rl/config/adapters.py) to a PEFT config; RoSA and PaCA are the
project's own PEFT tuners (rosa.py, paca.py), so PEFT's `get_peft_model`, `disable_adapter()`,
`merge_adapter()` and state-dict helpers work for all four unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, Protocol, TypeGuard

import torch
from peft import (
    LoraConfig,
    MissConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from rl.registries import ADAPTERS
from trainers.adapters.paca import PacaConfig
from trainers.adapters.rosa import RosaConfig
from trainers.adapters.rosa_schedule import RosaSchedule

if TYPE_CHECKING:
    from rl.config.adapters import AdapterConfig, BoneAdapter, LoRAAdapter, PaCAAdapter, RoSAAdapter

ADAPTER_NAME = "default"


class AdapterSchedule(Protocol):
    """A training-time adapter schedule; the PolicyTrainer calls it once per optimizer update."""

    def before_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """Called after `step`'s backward (gradients present), before `optimizer.step()`."""


@ADAPTERS.register("lora")
def lora_config(cfg: LoRAAdapter) -> LoraConfig:
    """LoRA (arXiv 2106.09685): W0 + (alpha/r) B A, B initialised to zero."""
    # PEFT annotates lora_alpha as int but scales by alpha / r: a float alpha is what it computes with
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                      lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


@ADAPTERS.register("bone")
def bone_config(cfg: BoneAdapter) -> MissConfig:
    """Bone / MiSS (arXiv 2409.15371): PEFT removed BoneConfig; MissConfig(init_weights=True) is Bone."""
    inits: dict[str, bool | Literal["bat", "mini"]] = {"bone": True, "bat": "bat", "mini": "mini"}
    init = inits[cfg.variant]
    return MissConfig(r=cfg.r, mini_r=cfg.mini_r, miss_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      init_weights=init, task_type="CAUSAL_LM")


@ADAPTERS.register("rosa")
def rosa_config(cfg: RoSAAdapter) -> RosaConfig:
    """RoSA (arXiv 2401.04679): LoRA + a sparse delta whose support the schedule picks from gradients."""
    impl = "gather" if cfg.impl == "auto" else cfg.impl
    return RosaConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, density=cfg.density, impl=impl,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


@ADAPTERS.register("paca")
def paca_config(cfg: PaCAAdapter) -> PacaConfig:
    """PaCA (arXiv 2503.01905): r random input columns of each weight trained directly."""
    return PacaConfig(r=cfg.r, paca_alpha=cfg.alpha, mode=cfg.mode, target_modules=list(cfg.target_modules),
                      task_type="CAUSAL_LM")


def _rosa_schedule(model: torch.nn.Module, cfg: RoSAAdapter, optimizer: torch.optim.Optimizer | None
                   ) -> RosaSchedule:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.accumulator_dtype]
    return RosaSchedule(model, cfg.warmup_steps, cfg.grad_collection_steps, cfg.density, cfg.grad_accumulation,
                        cfg.restart_after_mask, dtype, ADAPTER_NAME, optimizer)


# Adapters whose training needs a per-step schedule; the others have none. Each builder takes
# (model, its own adapter config class, optimizer).
_SCHEDULES: dict[str, Callable[..., AdapterSchedule]] = {
    "rosa": _rosa_schedule}


def peft_config(cfg: AdapterConfig) -> PeftConfig:
    """The PEFT config for a project adapter config (`adapter:` section of the job)."""
    return ADAPTERS.get(cfg.name)(cfg)


def apply_adapter(model: torch.nn.Module, cfg: AdapterConfig | None) -> torch.nn.Module:
    """`model` wrapped by the adapter `cfg` describes (a `PeftModel`); `cfg=None` returns `model` unchanged.

    Only adapter parameters require grad afterwards. PEFT upcasts bf16/fp16 adapter weights to fp32.
    """
    if cfg is None:
        return model
    return get_peft_model(model, peft_config(cfg), adapter_name=ADAPTER_NAME)


def schedule_for(model: torch.nn.Module, cfg: AdapterConfig | None, optimizer: torch.optim.Optimizer | None
                 ) -> AdapterSchedule | None:
    """The adapter's per-optimizer-step hook object, or None (full fine-tuning, LoRA, Bone, PaCA).

    `optimizer` is the one that trains `model`: a schedule may change its state (RoSA's restart clears the
    restarted adapters' moments), so build the schedule after the optimizer.
    """
    if cfg is None or cfg.name not in _SCHEDULES:
        return None
    return _SCHEDULES[cfg.name](model, cfg, optimizer)


def is_adapted(model: torch.nn.Module) -> TypeGuard[PeftModel]:
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def disable_adapter(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block the model computes with exactly its base weights (the RL reference policy)."""
    if not is_adapted(model):
        raise TypeError("disable_adapter needs an adapter-wrapped model; a full fine-tune keeps a frozen copy instead")
    with model.disable_adapter():
        yield model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of everything that defines the adapter: trainable tensors and persistent buffers
    (RoSA's support indices and ready flag, PaCA's column indices and original columns), PEFT key names."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `adapter_state_dict`; fails on any missing or unexpected adapter key."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []))
    expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(f"adapter checkpoint does not match this model: unexpected {unexpected[:5]}, "
                         f"missing {missing[:5]}; was it saved with the same adapter config?")
