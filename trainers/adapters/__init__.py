"""Parameter-efficient adapters (ADAPTERS.md): LoRA, Bone (PEFT MiSS), RoSA, PaCA. PEFT is imported here only.

The API the rest of the project uses:
    apply_adapter(model, cfg)              -> PEFT-wrapped model (cfg None: model unchanged)
    schedule_for(model, cfg, optimizer)    -> AdapterSchedule or None; the PolicyTrainer calls
                                              `schedule.before_optimizer_step(model, step)` after each backward,
                                              before `optimizer.step()` (RoSA's warm-up/collect/mask schedule)
    disable_adapter(model)                 -> context manager: exactly the base model (the reference policy)
    adapter_state_dict / load_adapter_state_dict   the adapter's tensors and defining buffers (checkpoints)
    merged_state_dict(model, only_adapted) -> merged full weights, base-model names, computed out of place
    lora_form(model, out_dir)              -> True after writing a PEFT LoRA dir vLLM can hot-load (exact forms)
    lora_rank(model)                       -> the rank lora_form writes, or None when there is no LoRA form
    lora_form_rank(cfg)                    -> the same from the config alone (before any model exists)
    export_merged(model, tokenizer, dir)   -> a plain Hugging Face model directory
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainers.adapters.core import (
    ADAPTER_NAME,
    AdapterSchedule,
    adapter_state_dict,
    apply_adapter,
    disable_adapter,
    is_adapted,
    load_adapter_state_dict,
    peft_config,
    schedule_for,
)
from trainers.adapters.export import export_merged, lora_form, lora_form_rank_of, lora_rank, merged_state_dict

if TYPE_CHECKING:
    from rl.config.adapters import AdapterConfig

__all__ = [
    "ADAPTER_NAME",
    "AdapterSchedule",
    "adapter_state_dict",
    "apply_adapter",
    "disable_adapter",
    "export_merged",
    "is_adapted",
    "load_adapter_state_dict",
    "lora_form",
    "lora_form_rank",
    "lora_rank",
    "merged_state_dict",
    "peft_config",
    "schedule_for",
]


def lora_form_rank(cfg: AdapterConfig | None) -> int | None:
    """The rank of the exact PEFT-LoRA form `lora_form` writes for adapter `cfg` (what a vLLM engine's
    max_lora_rank must cover), or None when it has none (no adapter, RoSA, Bone `bat`): then the rollout side
    gets merged full weights. Decided on the PEFT config, by the same rule as `lora_rank(model)`."""
    return None if cfg is None else lora_form_rank_of(peft_config(cfg))
