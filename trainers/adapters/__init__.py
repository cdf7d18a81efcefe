"""Parameter-efficient adapters (ADAPTERS.md). PEFT is imported in this package and nowhere else.

The API the rest of the project uses:
    apply_adapter(model, cfg)            -> model wrapped with the adapter (cfg None: unchanged)
    schedule_for(model, cfg)             -> per-optimizer-step hook object or None (RoSA's mask schedule)
    adapter_state_dict / load_adapter_state_dict   checkpoint the adapter (and buffers defining it)
    merged_state_dict(model)             -> full weights with the adapter merged, base names, out of place
    lora_form(model, out_dir)            -> True after writing a PEFT LoRA dir vLLM can hot-load (exact forms only)
    export_merged(model, tokenizer, dir) -> a plain Hugging Face model directory
The reference policy is `model.disable_adapter()` (PEFT's context manager): exactly the base model.
"""

from __future__ import annotations

from trainers.adapters.core import (adapter_state_dict, apply_adapter, export_merged, load_adapter_state_dict,
                                    lora_form, merged_state_dict, schedule_for)

__all__ = ["apply_adapter", "schedule_for", "adapter_state_dict", "load_adapter_state_dict", "merged_state_dict",
           "lora_form", "export_merged"]
