"""ADAPTERS.md §8.2: RoSA mask selection, accumulation, gradients, path parity and the schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from adapter_testlib import TARGETS, build_lm, tokens
from peft import LoraConfig, get_peft_model

from rl.config.adapters import RoSAAdapter
from trainers.adapters import apply_adapter, schedule_for
from trainers.adapters.rosa import RosaConfig, RosaLayer
from trainers.adapters.rosa_schedule import accumulate, make_mask, rosa_layers

if TYPE_CHECKING:
    from rl.batch import RolloutBatch

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


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("impl", ["gather", "sampled"])
def test_efficient_paths_agree_with_the_reference(impl, dtype, rtol):
    """Output and every gradient within rtol of the tensor's largest entry. Measured over 200 inputs: 5e-16
    (float64) and 3e-7 (float32). Not elementwise: dA entries reach ~1e3 and some cancel to ~1, where
    float32 rounding of the large terms breaks any per-entry relative bound."""
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = grads(rosa_linear("reference").to(dtype), x)
    got = grads(rosa_linear(impl).to(dtype), x)
    for key in expected:
        assert got[key].dtype == dtype, key
        scale = float(expected[key].abs().max())
        assert scale > 0 and float((got[key] - expected[key]).abs().max()) <= rtol * scale, key


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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = schedule_for(model, cfg, optimizer)
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
    schedule = schedule_for(model, cfg, None)
    ids = tokens(seed=9)
    model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: make_mask(layer.probe.grad.square(), 0.05) for n, layer in model.named_modules()
                if isinstance(layer, RosaLayer)}
    schedule.before_optimizer_step(model, 0)
    for name, layer in model.named_modules():
        if isinstance(layer, RosaLayer):
            assert torch.equal(layer.rosa_spa_idx[A], expected[name]), name


def restarted_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable tensors a restart resets: every RoSA layer's LoRA A, B and sparse values."""
    return [p for layer in rosa_layers(model) for p in layer.parameters() if p.requires_grad]


def assert_fresh_moments(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """No Adam history: the state is absent (AdamW re-creates it at zero) or exp_avg, exp_avg_sq and step are 0."""
    for p in params:
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                assert float(torch.as_tensor(state[key]).abs().max()) == 0.0, key


def assert_first_adam_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """The moments after one step from fresh: step 1, exp_avg = (1-b1) g, exp_avg_sq = (1-b2) g² (g the used grad)."""
    b1, b2 = optimizer.param_groups[0]["betas"]
    for p in params:
        state = optimizer.state[p]
        assert float(state["step"]) == 1.0
        assert torch.allclose(state["exp_avg"], (1 - b1) * p.grad, atol=1e-9, rtol=1e-6)
        assert torch.allclose(state["exp_avg_sq"], (1 - b2) * p.grad.square(), atol=1e-12, rtol=1e-6)


def test_restart_clears_the_adam_moments_of_the_restarted_parameters():
    """restart_after_mask resets the adapters and their AdamW state (exp_avg, exp_avg_sq, step) at mask time."""
    cfg = RoSAAdapter(r=8, alpha=16, density=0.05, warmup_steps=2, grad_collection_steps=1, restart_after_mask=True,
                      target_modules=TARGETS)
    model = apply_adapter(build_lm(), cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = schedule_for(model, cfg, optimizer)
    params = restarted_parameters(model)
    for step in range(4):
        optimizer.zero_grad(set_to_none=True)
        ids = tokens(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        schedule.before_optimizer_step(model, step)
        optimizer.step()
        if step == 1:  # two warm-up steps: LoRA has real Adam history to clear
            assert all(float(optimizer.state[p]["step"]) == 2.0 for p in params if p.grad is not None)
        if step == 2:  # mask built at this step's hook: restart
            assert next(rosa_layers(model)).spa_ready(A)
            assert_fresh_moments(optimizer, params)
        if step == 3:
            assert_first_adam_step(optimizer, params)


def test_restart_needs_the_optimizer():
    cfg = RoSAAdapter(r=8, alpha=16, density=0.05, restart_after_mask=True, target_modules=TARGETS)
    with pytest.raises(ValueError, match="optimizer"):
        schedule_for(apply_adapter(build_lm(), cfg), cfg, None)


def _learner_batch(vocab: int, rows: int = 4, prompt: int = 3, completion: int = 5) -> RolloutBatch:
    from rl.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    width = prompt + completion
    loss = torch.zeros(rows, width, dtype=torch.bool)
    loss[:, prompt:] = True
    batch = RolloutBatch(
        input_ids=torch.randint(1, vocab, (rows, width), generator=g),
        attention_mask=torch.ones(rows, width, dtype=torch.bool),
        loss_mask=loss, sampling_logprobs=torch.where(loss, -1.0, 0.0), prompt_lengths=torch.full((rows,), prompt),
        group_ids=torch.zeros(rows, dtype=torch.long), policy_version=0, finish_reasons=["stop"] * rows,
        prompt_texts=[""] * rows, completion_texts=[""] * rows, sample_meta=[{}] * rows)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    return batch.with_rewards(rewards).with_advantages(rewards - rewards.mean()).validate()


def test_learner_restart_clears_the_adam_moments(tiny_model_dir):
    """Through the real PolicyLearner and PolicyTrainer steps (the trainer's own AdamW): after the step whose hook
    chooses the mask, the restarted parameters have no Adam history, and the next step starts it afresh."""
    from rl.config.job import JobConfig
    from rl.loop.learner import PolicyLearner

    job = JobConfig.model_validate({
        "model": {"path": tiny_model_dir}, "trainer": {"device": "cpu", "lr": 1e-3, "max_steps": 4},
        "adapter": {"name": "rosa", "r": 4, "alpha": 8, "density": 0.01, "warmup_steps": 1,
                    "grad_collection_steps": 1, "restart_after_mask": True, "target_modules": ["q_proj", "v_proj"]}})
    learner = PolicyLearner(job, tiny_model_dir)
    optimizer = learner.trainer.optimizer
    params = restarted_parameters(learner.model)
    batch = _learner_batch(learner.model.config.vocab_size)
    learner.train_step(batch)  # warm-up: LoRA gets Adam history
    assert any(float(optimizer.state[p]["exp_avg"].abs().max()) > 0 for p in params if p in optimizer.state)
    learner.train_step(batch)  # collection step: the mask is chosen, the adapters restart
    assert next(rosa_layers(learner.model)).spa_ready(A)
    assert_fresh_moments(optimizer, params)
    learner.train_step(batch)
    assert_first_adam_step(optimizer, params)
