"""ADAPTERS.md §8.4–8.5 and §7: Bone/MiSS and LoRA specifics, LoRA-form directories, HF export, registry."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from adapter_testlib import (
    CASES,
    TARGETS,
    adapted,
    adapted_layers,
    base_key,
    build_lm,
    logits,
    randomise_adapter,
    tokens,
)
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl.config.adapters import BoneAdapter, LoRAAdapter, RoSAAdapter
from rl.registries import ADAPTERS
from trainers.adapters import apply_adapter, export_merged, lora_form, lora_rank, merged_state_dict, peft_config

BY_ID = {c.id: c for c in CASES}


def test_registry_names_the_four_adapters_and_config_is_strict():
    assert ADAPTERS.names() == ["bone", "lora", "paca", "rosa"]
    with pytest.raises(ValidationError):
        RoSAAdapter(rank=8)


def test_bone_is_peft_miss():
    assert hasattr(peft, "BoneConfig") is False
    config = peft_config(BoneAdapter(r=16))
    assert isinstance(config, peft.MissConfig) and config.init_weights is True
    assert peft_config(BoneAdapter(r=16, variant="bat")).init_weights == "bat"


def test_lora_scaling():
    model = apply_adapter(build_lm(), LoRAAdapter(r=4, alpha=12, target_modules=TARGETS))
    assert {layer.scaling["default"] for _, layer in adapted_layers(model)} == {3.0}
    model = apply_adapter(build_lm(), LoRAAdapter(r=4, alpha=12, use_rslora=True, target_modules=TARGETS))
    assert {layer.scaling["default"] for _, layer in adapted_layers(model)} == {6.0}


@pytest.mark.parametrize("case_id", ["lora", "miss", "miss-mini", "paca", "paca-fused"])
def test_exact_lora_form_reproduces_the_merged_weights(case_id, tmp_path):
    model, _ = adapted(BY_ID[case_id])
    randomise_adapter(model)
    assert lora_form(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False and config["r"] == lora_rank(model)
    assert all(t.split(".")[-1] in TARGETS for t in config["target_modules"])  # suffixes or full module names
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))
               for k in tensors)
    scale = config["lora_alpha"] / config["r"]
    merged = merged_state_dict(model, only_adapted=True)
    for name, layer in adapted_layers(model):
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        w0 = layer.get_base_layer().weight.detach()
        assert torch.allclose(w0 + scale * b @ a, merged[base_key(name) + ".weight"], atol=1e-6, rtol=0), name
    served = peft.PeftModel.from_pretrained(build_lm(), str(tmp_path))
    assert torch.allclose(logits(served, tokens()), logits(model, tokens()), atol=1e-5)


@pytest.mark.parametrize("case_id", ["rosa", "miss-bat"])
def test_no_lora_form_without_an_exact_one(case_id, tmp_path):
    model, _ = adapted(BY_ID[case_id])
    assert lora_form(model, str(tmp_path / "out")) is False and lora_rank(model) is None
    assert not (tmp_path / "out").exists()


def test_convert_to_lora_for_miss_is_exact_with_padding():
    model, _ = adapted(BY_ID["miss"])  # r = 48: 64 % 48 and 176 % 48 are not 0
    randomise_adapter(model)
    config, tensors = peft.convert_to_lora(model, rank=48)
    assert config.lora_alpha == config.r == 48
    merged = merged_state_dict(model, only_adapted=True)
    for name, layer in adapted_layers(model):
        w0 = layer.get_base_layer().weight.detach()
        delta = tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
        assert torch.allclose(w0 + delta, merged[base_key(name) + ".weight"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case_id", ["lora", "rosa", "paca"])
def test_export_merged_is_a_plain_transformers_model(case_id, tmp_path):
    model, _ = adapted(BY_ID[case_id])
    randomise_adapter(model)
    export_merged(model, None, str(tmp_path))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert not any("lora" in k or "paca" in k or "rosa" in k for k in exported.state_dict())
    assert torch.allclose(logits(exported, tokens()), logits(model, tokens()), atol=1e-5)
