"""Adapters out of the trainer: merged full weights (out of place), exact LoRA directories, HF export.

Rollout sync (ADAPTERS.md §7): an adapter with an exact LoRA form (LoRA; Bone/MiSS default and mini; PaCA via
one-hot A) is written by `lora_form` and hot-loaded by vLLM, which keeps ΔW apart from W0 and so avoids bf16
absorption of small updates. RoSA (high-rank sparse part) and MiSS `bat` (weight-dependent ΔW) have none;
they are pushed as `merged_state_dict` weights. Merging is always computed out of place per layer in fp32,
`(W0.float() + ΔW).to(dtype)`: PEFT's in-place merge/unmerge drifts in bf16 and the MiSS bat unmerge
inverts a matrix, so the training weights are never written here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, MissConfig, PeftConfig, PeftModel, convert_to_lora
from peft.tuners.miss import MissLayer, MissLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from trainers.adapters.core import ADAPTER_NAME, is_adapted
from trainers.adapters.paca import PacaConfig, PacaLayer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# ----- merged full weights ---------------------------------------------------------------------------
def _base_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The wrapped layer's weight, detached (a tuner layer here wraps an nn.Linear)."""
    weight = layer.get_base_layer().weight
    assert isinstance(weight, torch.Tensor), f"{type(layer).__name__} wraps a layer without a weight tensor"
    return weight.detach()


def _miss_merged(layer: MissLinear, adapter: str) -> torch.Tensor:
    weight = _base_weight(layer)
    if layer.miss_fn == "bat":  # ΔW_ij = W_ij D_i + D_i depends on W0 itself
        return (weight.float() + layer.get_delta_weight(adapter, weight.float().clone()).float()).to(weight.dtype)
    # get_delta_weight_miss returns the *full* weight and may write into its argument: give it a copy
    return layer.get_delta_weight_miss(adapter, weight.float().clone()).to(weight.dtype)


def _delta_merged(layer: BaseTunerLayer, adapter: str) -> torch.Tensor:
    weight = _base_weight(layer)
    # every tuner layer merged this way (LoRA's, RoSA's) defines get_delta_weight; PEFT's base class does not declare it
    delta = layer.get_delta_weight(adapter)  # type: ignore[attr-defined]
    return (weight.float() + delta.detach().float()).to(weight.dtype)


def _merged_weight(layer: BaseTunerLayer, adapter: str) -> torch.Tensor:
    """W_eff [m, n] in the base weight's dtype, computed out of place."""
    for cls, fn in _MERGERS.items():
        if isinstance(layer, cls):
            return fn(layer, adapter)
    return _delta_merged(layer, adapter)  # LoRA, RoSA: W0 + get_delta_weight


# layer class -> fn(layer of that class, adapter name) -> W_eff
_MERGERS: dict[type[BaseTunerLayer], Callable[..., torch.Tensor]] = {
    MissLayer: _miss_merged,
    PacaLayer: lambda layer, adapter: layer.merged_weight(adapter).detach(),  # columns replaced exactly
}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, only_adapted: bool = False) -> dict[str, torch.Tensor]:
    """Full weights with the adapter merged, under the base model's parameter names; the model is untouched.

    Adapted weights are new tensors; all others are the model's own tensors (detached, shared: do not write
    into them). `only_adapted=True` returns just the adapted layers' weights (the rest never change), which
    is all a rollout engine that already holds the base model needs.
    """
    if not is_adapted(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    tuner_names = []
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.active_adapters:
            merged[f"{name}.weight"] = _merged_weight(module, ADAPTER_NAME)
            tuner_names.append(name)
    if only_adapted:
        return merged
    for key, value in base.state_dict().items():
        owner = next((t for t in tuner_names if key.startswith(t + ".")), None)
        if owner is not None and not key.startswith(f"{owner}.base_layer."):
            continue  # an adapter tensor (lora_A, paca_idx, ...), not part of the base model
        merged.setdefault(key.replace(".base_layer.", "."), value.detach())
    return merged


# ----- exact LoRA form ---------------------------------------------------------------------------------
def _write_lora_dir(out_dir: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """adapter_config.json + adapter_model.safetensors, the layout vLLM's LoRA loader and PEFT read."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(cpu, str(Path(out_dir) / "adapter_model.safetensors"))


def _lora_as_is(model: PeftModel, config: LoraConfig, out_dir: str) -> bool:
    if config.use_dora:
        return False  # vLLM rejects DoRA
    model.save_pretrained(out_dir, selected_adapters=[ADAPTER_NAME])
    return True


def _miss_as_lora(model: PeftModel, config: MissConfig, out_dir: str) -> bool:
    if config.init_weights == "bat":
        return False  # ΔW depends on W0: only an SVD approximation exists
    lora_config, tensors = convert_to_lora(model, rank=config.r, adapter_name=ADAPTER_NAME)
    lora_config.task_type = "CAUSAL_LM"
    _write_lora_dir(out_dir, lora_config, tensors)
    return True


def paca_lora_state(model: torch.nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
    """PaCA's exact LoRA form: (rank, {PEFT key: tensor}) with A = one_hot(idx) [r, n], B = s·P − W0_cols [m, r]."""
    tensors, ranks = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, PacaLayer):
            a, b = module.lora_factors(ADAPTER_NAME)
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"PaCA layers have ranks {sorted(ranks)}; one rank is needed for a LoRA directory")
    return ranks.pop(), tensors


def _paca_as_lora(model: PeftModel, config: PacaConfig, out_dir: str) -> bool:
    rank, tensors = paca_lora_state(model)
    assert config.target_modules is not None  # PEFT fills it from the model type when the model is adapted
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    lora_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, task_type="CAUSAL_LM",
                             base_model_name_or_path=config.base_model_name_or_path)
    _write_lora_dir(out_dir, lora_config, tensors)
    return True


# PEFT config class -> fn(model, config of that class, out_dir) -> written?
_LORA_WRITERS: dict[type[PeftConfig], Callable[..., bool]] = {
    LoraConfig: _lora_as_is, MissConfig: _miss_as_lora, PacaConfig: _paca_as_lora}


def lora_form(model: torch.nn.Module, out_dir: str) -> bool:
    """Write the adapter as a PEFT LoRA directory if it has an exact LoRA form; False (nothing written) if not.

    The directory has `adapter_config.json` (r, lora_alpha, target_modules, use_dora=false) and
    `adapter_model.safetensors` with `base_model.model.<module>.lora_{A,B}.weight` keys only.
    """
    if not is_adapted(model):
        return False
    config = model.peft_config[ADAPTER_NAME]
    writer = _LORA_WRITERS.get(type(config))
    return bool(writer and writer(model, config, out_dir))


def lora_rank(model: torch.nn.Module) -> int | None:
    """The rank `lora_form` writes (what a vLLM engine's max_lora_rank must cover), or None if no LoRA form."""
    return lora_form_rank_of(model.peft_config[ADAPTER_NAME]) if is_adapted(model) else None


def lora_form_rank_of(config: PeftConfig) -> int | None:
    """The rank of the exact LoRA form of an adapter with this PEFT config, or None (RoSA; Bone `bat`, whose
    ΔW depends on W0 itself). The one rule behind `lora_rank(model)` and `lora_form_rank(job config)`."""
    if isinstance(config, (LoraConfig, PacaConfig)) or (
            isinstance(config, MissConfig) and config.init_weights != "bat"):
        return int(config.r)
    return None


# ----- Hugging Face export -------------------------------------------------------------------------------
def export_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str) -> None:
    """A plain Hugging Face directory (adapter merged) that transformers and vLLM load."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if is_adapted(model) else model
    fresh = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    missing, unexpected = fresh.load_state_dict(merged_state_dict(model), strict=False)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    real_missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if real_missing or unexpected:
        raise ValueError(f"export: weights do not match the base architecture ({real_missing[:3]}, {unexpected[:3]})")
    fresh.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
