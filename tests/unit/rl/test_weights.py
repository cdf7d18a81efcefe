"""The weight sync: one mode per job (rl/loop/weights.py), one typed value from the learner, one method on the
worker; the Ray handles and the worker pool offer the same methods as the Protocols in rl/types.py."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from rl.config import load_job
from rl.loop.cluster import LearnerHost, RemoteLearner, RolloutHost, RolloutPool
from rl.loop.learner import PolicyLearner
from rl.loop.weights import sync_mode
from rl.loop.worker import EngineWorker
from rl.models import load_causal_lm
from rl.types import FullWeights, Learner, LoraFiles, RolloutWorker, SharedModel
from trainers.adapters import apply_adapter, lora_form, lora_form_rank

LORA = "adapter={name: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"
ADAPTERS = {
    "lora": "{name: lora, r: 4}", "bone": "{name: bone, r: 4}", "bone_mini": "{name: bone, r: 4, variant: mini}",
    "bone_bat": "{name: bone, r: 4, variant: bat}", "rosa": "{name: rosa, r: 4, density: 0.01}",
    "paca": "{name: paca, r: 4}"}


@pytest.mark.parametrize(("overrides", "mode"), [
    ([], "shared"),                                                   # local HF engine, sync: the learner's model
    ([LORA], "shared"),
    (["trainer.mode=async"], "full"),                                 # the engine holds a copy
    (["cluster={name: ray}"], "full"),
    (["trainer.mode=async", LORA], "full"),                           # the HF engine takes merged weights
    (["rollout.backend=vllm"], "full"),                               # no adapter
    (["rollout.backend=vllm", LORA], "lora"),
    (["rollout.backend=vllm", f"adapter={ADAPTERS['bone_mini']}"], "lora"),
    (["rollout.backend=vllm", f"adapter={ADAPTERS['paca']}"], "lora"),
    (["rollout.backend=vllm", f"adapter={ADAPTERS['rosa']}"], "full"),  # no exact LoRA form
    (["rollout.backend=vllm", f"adapter={ADAPTERS['bone_bat']}"], "full"),
])
def test_sync_mode_is_chosen_from_the_job_and_the_adapter(overrides, mode):
    assert sync_mode(load_job("tiny", overrides)) == mode


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_lora_form_rank_agrees_with_the_lora_form_written(name, tiny_model_dir, tmp_path):
    """The config-only answer (what the vLLM engine is started with) is what `lora_form` writes for the model."""
    job = load_job("tiny", [f"adapter={ADAPTERS[name]}"])
    model = apply_adapter(load_causal_lm(tiny_model_dir, "float32", "cpu"), job.adapter)
    rank = lora_form_rank(job.adapter)
    written = lora_form(model, str(tmp_path))
    assert written == (rank is not None)
    if written:
        assert json.loads((Path(tmp_path) / "adapter_config.json").read_text())["r"] == rank
    assert lora_form_rank(None) is None


def test_worker_loads_each_kind_of_weight_sync(tiny_model_dir):
    job = load_job("tiny", ["trainer.mode=async", "trainer.device=cpu", LORA])
    learner = PolicyLearner(job, tiny_model_dir)
    worker = EngineWorker(job, tiny_model_dir)
    try:
        with torch.no_grad():
            for name, p in learner.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # a policy the engine's base weights are not
        full = learner.weights("full")
        assert isinstance(full, FullWeights)
        assert worker.load_weights(full, 3) >= 0 and worker.engine.policy_version == 3
        engine_state = worker.engine.model.state_dict()
        assert all(torch.equal(engine_state[k], v) for k, v in full.tensors.items())
        lora = learner.weights("lora")
        assert isinstance(lora, LoraFiles) and "adapter_config.json" in lora.files
        worker.load_weights(lora, 4)  # the HF engine merges it
        assert worker.engine.policy_version == 4 and worker.version == 4
        worker.load_weights(SharedModel(), 5)
        assert worker.engine.policy_version == 5
        with pytest.raises(TypeError, match="not a WeightSync"):
            worker.load_weights({"kind": "full"}, 6)  # type: ignore[arg-type]
    finally:
        worker.close()


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


@pytest.mark.parametrize(("protocol", "implementations"), [
    (Learner, [PolicyLearner, LearnerHost, RemoteLearner]),
    (RolloutWorker, [EngineWorker, RolloutHost, RolloutPool]),
])
def test_local_objects_and_ray_handles_offer_the_protocol_methods(protocol, implementations):
    """Every method of the Protocol, with its parameters, on the local object, the actor and the caller's handle."""
    wanted = _methods(protocol)
    for cls in implementations:
        have = _methods(cls)
        for name, signature in wanted.items():
            assert name in have, f"{cls.__name__} lacks {name}()"
            # Ray adds `_ray_trace_ctx` to the methods of a class it has made an actor of (in place, in-process)
            params = [p for p in have[name].parameters if p != "_ray_trace_ctx"]
            assert params == list(signature.parameters), (cls.__name__, name)
