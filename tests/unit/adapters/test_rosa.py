"""ADAPTERS.md §8.2: RoSA mask selection, accumulation, gradients, path parity and the schedule."""

from __future__ import annotations

import pytest
import torch
from adapter_testlib import TARGETS, build_lm, tokens
from peft import LoraConfig, get_peft_model

from rl.config.adapters import RoSAAdapter
from trainers.adapters import apply_adapter, schedule_for
from trainers.adapters.rosa import RosaConfig, RosaLayer
from trainers.adapters.rosa_schedule import accumulate, make_mask, rosa_layers

A = "default"


def test_make_mask_returns_exactly_the_top_entries():
    scores = torch.rand(16, 24) * 0.1
    top = torch.tensor([5, 77, 100, 383, 200, 3, 250, 19, 301])  # int(0.025·384) = 9 planted maxima
    scores.view(-1)[top] = torch.arange(1, 10, dtype=torch.float32) * (-1) ** torch.arange(9)  # |.| counts
    assert torch.equal(make_mask(scores, 0.025), top.sort().values)
    assert make_mask(torch.rand(16, 24), 0.025).numel() == make_mask(torch.rand(16, 24), 0.025).numel() == 9


def test_accumulation_modes():
    g1, g2 = torch.randn(4, 6), torch.randn(4, 6)
    squared = accumulate(accumulate(None, g1, 0, "mean_squared"), g2, 1, "mean_squared")
    assert torch.allclose(squared, (g1.square() + g2.square()) / 2, atol=1e-6)
    mean = accumulate(accumulate(None, g1, 0, "mean"), g2, 1, "mean")
    assert torch.allclose(mean, (g1 + g2) / 2, atol=1e-6)


def rosa_linear(impl: str, seed: int = 0) -> RosaLayer:
    torch.manual_seed(seed)
    layer = RosaLayer(torch.nn.Linear(24, 16), A, RosaConfig(r=4, lora_alpha=8, density=0.1, impl=impl))
    layer.set_mask(A, torch.randperm(16 * 24, generator=torch.Generator().manual_seed(1))[: int(0.1 * 16 * 24)])
    with torch.no_grad():
        layer.rosa_B[A].weight.normal_()
        layer.rosa_spa_values[A].normal_()
    layer.base_layer.requires_grad_(False)
    return layer


def grads(layer: RosaLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.square().sum() + out.sum()).backward()
    return {"out": out.detach(), "dx": x.grad, "dA": layer.rosa_A[A].weight.grad, "dB": layer.rosa_B[A].weight.grad,
            "dvalues": layer.rosa_spa_values[A].grad}


@pytest.mark.parametrize("impl", ["gather", "sampled"])
def test_efficient_paths_agree_with_the_reference(impl):
    x = torch.randn(3, 5, 24)
    expected = grads(rosa_linear("reference"), x)
    got = grads(rosa_linear(impl), x)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-5), key


def test_sparse_value_gradient_is_the_dense_gradient_on_the_support():
    layer = rosa_linear("reference")
    layer.base_layer.weight.requires_grad_(True)
    layer(torch.randn(7, 24)).pow(2).sum().backward()
    idx = layer.rosa_spa_idx[A]
    assert torch.allclose(layer.rosa_spa_values[A].grad, layer.base_layer.weight.grad.flatten()[idx], atol=1e-6)


def test_probe_gradient_is_the_dense_weight_gradient():
    layer = rosa_linear("gather")
    layer.arm_probe()
    x = torch.randn(7, 24)
    layer(x).pow(2).sum().backward()
    reference = rosa_linear("reference")
    reference.base_layer.weight.requires_grad_(True)
    reference(x).pow(2).sum().backward()
    assert torch.allclose(layer.take_probe_grad(), reference.base_layer.weight.grad, atol=1e-5)


def test_lora_part_matches_plain_peft_lora():
    cfg = RoSAAdapter(r=8, alpha=16, density=0.05, target_modules=TARGETS)
    rosa = apply_adapter(build_lm(), cfg)
    lora = get_peft_model(build_lm(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for name, layer in rosa.named_modules():
            if isinstance(layer, RosaLayer):
                twin = lora.get_submodule(name)
                twin.lora_A[A].weight.copy_(layer.rosa_A[A].weight)
                layer.rosa_B[A].weight.normal_()
                twin.lora_B[A].weight.copy_(layer.rosa_B[A].weight)
    ids = tokens()
    rosa(input_ids=ids, labels=ids).loss.backward()
    lora(input_ids=ids, labels=ids).loss.backward()
    for name, layer in rosa.named_modules():
        if isinstance(layer, RosaLayer):
            twin = lora.get_submodule(name)
            assert torch.allclose(layer.rosa_A[A].weight.grad, twin.lora_A[A].weight.grad, atol=1e-6)
            assert torch.allclose(layer.rosa_B[A].weight.grad, twin.lora_B[A].weight.grad, atol=1e-6)
            assert layer.rosa_spa_values[A].grad is None  # no mask yet: the sparse part is not in the graph


def run_schedule(cfg: RoSAAdapter, steps: int) -> tuple[torch.nn.Module, list[dict]]:
    """`steps` AdamW updates driven like the PolicyTrainer drives them; a record per step."""
    model = apply_adapter(build_lm(), cfg)
    schedule = schedule_for(model, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layer = next(rosa_layers(model))
    records = []
    for step in range(steps):
        ids = tokens(seed=step)
        optimizer.zero_grad(set_to_none=True)
        collecting = layer.probe is not None
        model(input_ids=ids, labels=ids).loss.backward()
        values_grad = layer.rosa_spa_values[A].grad is not None
        schedule.before_optimizer_step(model, step)
        optimizer.step()
        records.append({"collecting": collecting, "values_grad": values_grad, "ready": layer.spa_ready(A),
                        "values_nonzero": bool(layer.rosa_spa_values[A].detach().abs().sum() > 0),
                        "lora_b_nonzero": bool(layer.rosa_B[A].weight.detach().abs().sum() > 0)})
    return model, records


def test_schedule_wl2_warms_up_collects_then_trains_the_sparse_part():
    cfg = RoSAAdapter(r=8, alpha=16, density=0.05, warmup_steps=2, grad_collection_steps=1, target_modules=TARGETS)
    model, rec = run_schedule(cfg, 5)
    assert [r["collecting"] for r in rec] == [False, False, True, False, False]
    assert [r["ready"] for r in rec] == [False, False, True, True, True]  # masks exist after step 2's hook
    assert [r["values_grad"] for r in rec] == [False, False, False, True, True]  # SpA trainable from step 3
    assert not rec[2]["values_nonzero"] and rec[4]["values_nonzero"]
    assert all(r["lora_b_nonzero"] for r in rec)  # LoRA trains throughout
    nnz = {layer.rosa_spa_idx[A].numel() / (layer.in_features * layer.out_features) for layer in rosa_layers(model)}
    assert all(abs(d - 0.05) < 0.01 for d in nnz)
    assert all(layer.probe is None for layer in rosa_layers(model))


def test_schedule_with_restart_resets_both_adapters_at_mask_time():
    cfg = RoSAAdapter(r=8, alpha=16, density=0.05, warmup_steps=1, grad_collection_steps=2, restart_after_mask=True,
                      target_modules=TARGETS)
    _, rec = run_schedule(cfg, 4)
    assert [r["collecting"] for r in rec] == [False, True, True, False]
    assert [r["ready"] for r in rec] == [False, False, True, True]
    assert not rec[2]["lora_b_nonzero"] and not rec[2]["values_nonzero"]  # restarted from the inits
    assert rec[3]["lora_b_nonzero"] and rec[3]["values_nonzero"]


def test_mask_follows_the_collected_gradient():
    cfg = RoSAAdapter(r=8, alpha=16, density=0.05, warmup_steps=0, target_modules=TARGETS)
    model = apply_adapter(build_lm(), cfg)
    schedule = schedule_for(model, cfg)
    ids = tokens(seed=9)
    model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: make_mask(l.probe.grad.square(), 0.05) for n, l in model.named_modules() if isinstance(l, RosaLayer)}
    schedule.before_optimizer_step(model, 0)
    for name, layer in model.named_modules():
        if isinstance(layer, RosaLayer):
            assert torch.equal(layer.rosa_spa_idx[A], expected[name]), name
