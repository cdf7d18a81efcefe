"""ADAPTERS.md §8.1: the common tests, run for every adapter variant on a tiny fp32 Llama."""

from __future__ import annotations

import pytest
import torch
from adapter_testlib import (
    CASES,
    adapted,
    adapted_layers,
    base_key,
    build_lm,
    logits,
    randomise_adapter,
    tokens,
    train_step,
)
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.miss import MissLayer

from trainers.adapters import adapter_state_dict, disable_adapter, load_adapter_state_dict, merged_state_dict
from trainers.adapters.paca import PacaLayer
from trainers.adapters.rosa import RosaLayer

CASE_IDS = [c.id for c in CASES]
A = "default"


def explicit_weight(layer, w0: torch.Tensor) -> torch.Tensor:
    """W_eff from the §2–§5 formulas, written independently of the tuner code. w0 [m, n] -> [m, n]."""
    m, n = w0.shape
    if isinstance(layer, LoraLayer):
        return w0 + layer.scaling[A] * layer.lora_B[A].weight @ layer.lora_A[A].weight
    if isinstance(layer, RosaLayer):
        idx, values = layer.rosa_spa_idx[A], layer.rosa_spa_values[A]
        sparse = torch.zeros(m, n)
        sparse[idx // n, idx % n] = values
        return w0 + layer.rosa_scaling[A] * layer.rosa_B[A].weight @ layer.rosa_A[A].weight + sparse
    if isinstance(layer, PacaLayer):
        out = w0.clone()
        out[:, layer.paca_idx[A]] = layer.paca_scaling[A] * layer.paca_P[A]
        return out
    block = layer.miss_block[A]
    if layer.miss_fn == "bat":  # ΔW_ij = W_ij D_i + D_i on r×r blocks (i: output block, j: input block)
        r, out = block.shape[-1], w0.clone()
        for i in range(m // r):
            for j in range(n // r):
                w_ij = w0[i * r:(i + 1) * r, j * r:(j + 1) * r]
                out[i * r:(i + 1) * r, j * r:(j + 1) * r] = w_ij + w_ij @ block[i] + block[i]
        return out
    if layer.miss_fn == "mini":
        block = block.repeat(1, m // block.shape[1])
    r = block.shape[0]
    return w0 + block.t()[:, torch.arange(n) % r]  # ΔW[o, j] = D[j mod r, o]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_identity_at_init(case):
    model, reference = adapted(case)
    ids = tokens()
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)
    for _, layer in adapted_layers(model):
        if isinstance(layer, PacaLayer):
            w0 = layer.get_base_layer().weight
            assert torch.allclose(layer.paca_scaling[A] * layer.paca_P[A], w0[:, layer.paca_idx[A]], atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_trainable_parameter_count_matches_the_formula(case):
    model, _ = adapted(case)
    expected = sum(case.per_layer(layer.out_features, layer.in_features) for _, layer in adapted_layers(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert len(adapted_layers(model)) == 6  # 3 targets x 2 layers


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_step_changes_only_adapter_parameters(case):
    model, _ = adapted(case)
    randomise_adapter(model)  # MiSS starts at D = 0, where some gradients vanish
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model)
    fused = getattr(case.cfg, "mode", None) == "fused"
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert not torch.equal(p.detach(), trainable[name]), f"{name} did not move"
        elif fused and name.endswith("base_layer.weight"):  # fused PaCA writes s·P into W[:, idx] only
            layer = model.get_submodule(name.removesuffix(".base_layer.weight"))
            keep = torch.ones(p.shape[1], dtype=torch.bool)
            keep[layer.paca_idx[A]] = False
            assert torch.equal(p[:, keep], frozen[name][:, keep]), name
        else:
            assert torch.equal(p, frozen[name]), name
    for name, b in model.named_buffers():  # PaCA W0_cols and idx, RoSA idx are never trained
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_then_unmerge(case):
    model, _ = adapted(case)
    randomise_adapter(model)
    ids = tokens()
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in adapted_layers(model)}
    out_unmerged = logits(model, ids)
    model.merge_adapter()
    assert torch.allclose(logits(model, ids), out_unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    atol = 1e-4 if getattr(case.cfg, "variant", "") == "bat" else 1e-6
    for name, layer in adapted_layers(model):
        weight = layer.get_base_layer().weight
        if isinstance(layer, PacaLayer):
            assert torch.equal(weight, w0[name]), name  # exact through the W0_cols buffer
        else:
            assert torch.allclose(weight, w0[name], atol=atol, rtol=0), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merged_weight_matches_the_explicit_formula(case):
    model, _ = adapted(case)
    randomise_adapter(model)
    merged = merged_state_dict(model, only_adapted=True)
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            w0 = layer.get_base_layer().weight
            expected = explicit_weight(layer, w0)
            assert torch.allclose(merged[base_key(name) + ".weight"], expected, atol=1e-5, rtol=0), name
            if hasattr(layer, "get_delta_weight") and not isinstance(layer, MissLayer):
                assert torch.allclose(w0 + layer.get_delta_weight(A), expected, atol=1e-5, rtol=0), name
            if isinstance(layer, MissLayer) and layer.miss_fn != "bat":
                delta = expected - w0
                r = layer.miss_block[A].shape[0]
                assert torch.allclose(delta[:, : delta.shape[1] - r], delta[:, r:], atol=1e-6)
                assert torch.linalg.matrix_rank(delta) <= r


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_disabled_adapter_is_exactly_the_base_model_after_training(case):
    model, reference = adapted(case)
    train_step(model)
    ids = tokens()
    assert not torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-4)  # training moved the policy
    with disable_adapter(model):
        assert torch.equal(logits(model, ids), logits(reference, ids))
    with model.disable_adapter():  # PEFT's own context manager, used by TRL-style reference code
        assert torch.equal(logits(model, ids), logits(reference, ids))
    assert not torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-4)  # enabled again


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_and_load_round_trip(case, tmp_path):
    model, _ = adapted(case)
    train_step(model)
    ids = tokens()
    expected = logits(model, ids)
    model.save_pretrained(str(tmp_path))
    torch.manual_seed(123)  # a different RNG state: PaCA/RoSA must restore idx from the file, not re-draw it
    loaded = PeftModel.from_pretrained(build_lm(), str(tmp_path))
    assert torch.equal(logits(loaded, ids), expected)
    torch.manual_seed(321)
    fresh, _ = adapted(case, seed=0)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    assert torch.equal(logits(fresh, ids), expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_out_of_place_merge_equals_peft_merge_and_leaves_the_model_alone(case):
    model, _ = adapted(case)
    randomise_adapter(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    merged = merged_state_dict(model)
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert set(merged) == set(build_lm().state_dict())  # base-model names, nothing else
    model.merge_adapter()
    base = model.get_base_model().state_dict()
    for name, tensor in merged.items():
        peft_name = name if name in base else name.replace(".weight", ".base_layer.weight")
        peft_name = peft_name if peft_name in base else name.replace(".bias", ".base_layer.bias")
        assert torch.allclose(tensor, base[peft_name], atol=1e-5, rtol=0), name


def test_adapter_state_dict_names_the_defining_buffers():
    keys = {c.id: set(adapter_state_dict(adapted(c)[0])) for c in CASES if c.id in ("rosa", "paca")}
    assert any("rosa_spa_idx" in k for k in keys["rosa"]) and any("rosa_spa_ready" in k for k in keys["rosa"])
    assert any("paca_idx" in k for k in keys["paca"]) and any("paca_W0_cols" in k for k in keys["paca"])


def test_load_rejects_a_state_of_another_adapter():
    lora_state = adapter_state_dict(adapted(CASES[0])[0])
    with pytest.raises(ValueError, match="does not match"):
        load_adapter_state_dict(adapted(CASES[-2])[0], lora_state)
