"""Applying, saving, merging and exporting adapters through PEFT's tuner interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, MissConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from rl.registries import ADAPTERS

ADAPTER_NAME = "default"


@ADAPTERS.register("lora")
def lora_config(cfg: Any) -> LoraConfig:
    """LoRA (arXiv 2106.09685): W0 + (alpha/r) B A, B initialised to zero."""
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none", task_type="CAUSAL_LM")


@ADAPTERS.register("bone")
def bone_config(cfg: Any) -> MissConfig:
    """Bone / MiSS (arXiv 2409.15371): PEFT removed BoneConfig; MissConfig(init_weights=True) is Bone."""
    init = {"bone": True, "bat": "bat", "mini": "mini"}[cfg.variant]
    return MissConfig(r=cfg.r, target_modules=list(cfg.target_modules), init_weights=init, task_type="CAUSAL_LM")


def apply_adapter(model: Any, cfg: Any) -> Any:
    if cfg is None:
        return model
    peft_cfg = ADAPTERS.get(cfg.name)(cfg)
    return get_peft_model(model, peft_cfg, adapter_name=ADAPTER_NAME)


def schedule_for(model: Any, cfg: Any) -> Any:
    """A per-optimizer-step hook for adapters with a training schedule (none for LoRA and Bone)."""
    return None


def is_adapted(model: Any) -> bool:
    return isinstance(model, PeftModel)


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


def load_adapter_state_dict(model: Any, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter checkpoint has keys this model does not: {unexpected[:5]}")


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Full weights with the adapter merged, under the base model's parameter names; the training
    model is not modified (PEFT's merge_adapter would write into it)."""
    if not is_adapted(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.active_adapters:
                layer = module.get_base_layer()
                merged[f"{name}.weight"] = layer.weight + module.get_delta_weight(ADAPTER_NAME).to(layer.weight.dtype)
        prefixes = tuple(getattr(model, "prefix", "lora_") for _ in range(1)) + ("lora_", "miss_", "rosa_", "paca_")
        for key, value in base.state_dict().items():
            if any(f".{p}" in key for p in prefixes):
                continue
            merged.setdefault(key.replace(".base_layer", ""), value.detach())
    return merged


def lora_form(model: Any, out_dir: str) -> bool:
    """Write the adapter as a PEFT LoRA directory when it *is* LoRA (vLLM hot-loads those exactly)."""
    if not is_adapted(model) or not isinstance(model.peft_config[ADAPTER_NAME], LoraConfig):
        return False
    model.save_pretrained(out_dir, selected_adapters=[ADAPTER_NAME])
    nested = Path(out_dir) / ADAPTER_NAME
    if nested.is_dir():  # some PEFT versions nest non-default names; keep the files at the top level
        for item in nested.iterdir():
            item.rename(Path(out_dir) / item.name)
    return True


def export_merged(model: Any, tokenizer: Any, out_dir: str) -> None:
    """A plain Hugging Face directory (adapter merged) that transformers and vLLM load."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if is_adapted(model) else model
    fresh = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    missing, unexpected = fresh.load_state_dict(merged_state_dict(model), strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and base.config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise ValueError(f"export: weights do not match the base architecture ({real_missing[:3]}, {unexpected[:3]})")
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
