"""Reading a PEFT LoRA directory into merged full weights (for engines that cannot serve LoRA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file


def merged_from_lora_dir(base: Mapping[str, torch.Tensor], adapter_dir: str) -> dict[str, torch.Tensor]:
    """W = W0 + (alpha / r) B A for every LoRA pair in the directory; other weights are `base`'s.

    Only the changed weights are returned (the caller's base copy keeps the rest)."""
    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    if config.get("use_rslora"):
        scale = config["lora_alpha"] / config["r"] ** 0.5
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    merged = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        target = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
        merged[target] = base[target] + scale * (b.float() @ a.float()).to(base[target].dtype)
    return merged
