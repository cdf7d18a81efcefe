"""Collective weight sync (rl/loop/weight_channel.py) between real processes: a learner actor (rank 0, a real
PolicyLearner on the tiny model, its weights moved off the checkpoint) and two rollout-worker actors (a vLLM CPU
engine and a transformers engine), each its own Ray process, over their own gloo group.

In sync is judged independently of the sync's own verification: the vLLM engine's sampled tokens are scored by the
learner (per-token max |engine - learner| log-prob < 1e-4, as tests/integration/test_vllm_sync.py; before the
sync the engine still holds the checkpoint and misses by far more); the transformers engine's weights are compared
tensor by tensor. A corrupted sync is a real one: the vLLM worker's engine gets layer 0's k_proj and v_proj in each
other's place (a name-mapping bug), so it really samples from wrong weights; the verification must name both.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch

from rl.config import load_job
from rl.errors import UserError
from rl.loop.weight_channel import SyncLearnerHost, SyncRolloutHost, WeightSyncMismatch, connect, sync

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
TIMEOUT_S = 300.0
K, V = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def ray_module() -> Iterator[Any]:
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors below are defined in this file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()

def _learner_host(ray, factory, threads):
    """A one-rank SyncLearnerHost: the host starts empty and builds its learner in `build` (rl/loop/cluster.py)."""

    host = ray.remote(num_cpus=0)(SyncLearnerHost).remote(threads)
    ray.get(host.build.remote(factory, 0, 1, "", 0, "cpu", 60.0))
    return host



def _job(tmp_path: Any, backend: str) -> Any:
    return load_job("tiny", [f"rollout.backend={backend}", f"run_dir={tmp_path}", "logging.progress=false"])


def _moved_learner(job: Any, model_dir: str) -> Any:
    """A real learner whose trainable weights differ from where they start (as after training)."""
    from rl.loop.learner import PolicyLearner

    learner = PolicyLearner(job, model_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in learner.model.parameters():  # in place: tied embeddings stay tied
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return learner


class ChaosRolloutHost(SyncRolloutHost):
    """A SyncRolloutHost that can be told to load the next sync with two tensors' names swapped."""

    def swap_next(self, a: str, b: str) -> None:
        engine = self.worker.engine  # type: ignore[attr-defined]
        real = engine.push_weights_streamed
        swap = {a: b, b: a}

        def swapped(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], aliases: Mapping[str, str], fill: Any,
                    version: int) -> float:
            engine.push_weights_streamed = real  # once
            return real([(swap.get(n, n), d, s) for n, d, s in specs], aliases, fill, version)

        engine.push_weights_streamed = swapped

    def alter_next_adapter(self) -> None:
        """The next pushed adapter's weights file is rewritten (one tensor x10) before vLLM gets its folder."""
        from safetensors.torch import load_file, save_file

        engine = self.worker.engine  # type: ignore[attr-defined]
        real = engine.push_lora

        def altered(adapter_dir: str, version: int) -> float:
            engine.push_lora = real  # once
            path = f"{adapter_dir}/adapter_model.safetensors"
            tensors = load_file(path)
            first = sorted(tensors)[0]
            tensors[first] = tensors[first] * 10
            save_file(tensors, path)
            return real(adapter_dir, version)

        engine.push_lora = altered

    def hf_weights(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.worker.engine.model.state_dict().items()}  # type: ignore[attr-defined]


def _max_diff(ray: Any, learner: Any, worker: Any, prompts: Any, seed: int) -> float:
    from rl.types import SamplingParams

    batch = ray.get(worker.generate.remote(prompts, SamplingParams(group_size=4, max_new_tokens=8, seed=seed)))
    logprobs = ray.get(learner.logprobs.remote(batch))
    return float((logprobs - batch.sampling_logprobs).abs()[batch.loss_mask].max())


def test_collective_sync_into_vllm_and_hf_engines_and_a_corrupted_sync_is_detected(ray_module, tiny_model_dir,
                                                                                   tmp_path):
    from rl.loop.runtime import build_env
    from rl.loop.worker import EngineWorker
    from rl.models import load_tokenizer

    ray = ray_module
    vllm_job, hf_job = _job(tmp_path / "v", "vllm"), _job(tmp_path / "h", "hf")
    learner = _learner_host(ray, lambda: _moved_learner(hf_job, tiny_model_dir), 1)
    host = ray.remote(num_cpus=0)(ChaosRolloutHost)
    workers = [host.remote(lambda: EngineWorker(vllm_job, tiny_model_dir), 1),
               host.remote(lambda: EngineWorker(hf_job, tiny_model_dir), 1)]
    connect(ray, learner, workers, "cpu", TIMEOUT_S)
    prompts = list(build_env(hf_job, load_tokenizer(tiny_model_dir)).train_prompts())[:2]

    before = _max_diff(ray, learner, workers[0], prompts, seed=1)
    sent, received = sync(ray, [learner], workers, "full", 1, bucket_mib=1, verify=True, timeout_s=TIMEOUT_S)
    after = _max_diff(ray, learner, workers[0], prompts, seed=2)
    figures = [(r.path, round(r.seconds, 3), round(r.verify_s, 4)) for r in received]
    print(f"\nvLLM engine vs learner: before sync {before:.2e}, after {after:.2e}; buckets {sent.buckets}, "
          f"{sent.bytes / 2**20:.1f} MiB; receivers (path, s, verify s) {figures}")
    assert before > 1e-2 and after < 1e-4
    assert [r.version for r in received] == [1, 1] and received[0].path == "direct"
    assert sent.buckets > 1 and all(r.buckets == sent.buckets and r.verify_s > 0 for r in received)
    learner_weights = ray.get(learner.weights.remote("full")).tensors
    hf_weights = ray.get(workers[1].hf_weights.remote())
    assert all(torch.equal(hf_weights[n], t) for n, t in learner_weights.items())

    ray.get(workers[0].swap_next.remote(K, V))
    with pytest.raises(WeightSyncMismatch) as caught:
        sync(ray, [learner], workers, "full", 2, bucket_mib=1, verify=True, timeout_s=TIMEOUT_S)
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    assert K in message and V in message and "2 tensor(s)" in message and "version 2" in message
    corrupted = _max_diff(ray, learner, workers[0], prompts, seed=3)
    assert corrupted > 1e-2, f"the swap did not reach the engine ({corrupted:.2e})"

    sync(ray, [learner], workers, "full", 3, bucket_mib=1, verify=True, timeout_s=TIMEOUT_S)  # the group survives
    assert _max_diff(ray, learner, workers[0], prompts, seed=4) < 1e-4
    for actor in [*workers, learner]:
        ray.kill(actor)


def test_collective_lora_sync_hot_loads_the_adapter_and_an_altered_adapter_file_is_detected(ray_module,
                                                                                           tiny_model_dir, tmp_path):
    from rl.loop.runtime import build_env
    from rl.loop.worker import EngineWorker
    from rl.models import load_tokenizer

    ray = ray_module
    job = load_job("tiny", ["rollout.backend=vllm", f"run_dir={tmp_path}", "logging.progress=false",
                            "adapter={name: lora, r: 4, alpha: 8}"])
    learner = _learner_host(ray, lambda: _moved_learner(job, tiny_model_dir), 1)
    worker = ray.remote(num_cpus=0)(ChaosRolloutHost).remote(lambda: EngineWorker(job, tiny_model_dir), 1)
    connect(ray, learner, [worker], "cpu", TIMEOUT_S)
    prompts = list(build_env(job, load_tokenizer(tiny_model_dir)).train_prompts())[:2]

    before = _max_diff(ray, learner, worker, prompts, seed=1)
    sent, (received,) = sync(ray, [learner], [worker], "lora", 1, bucket_mib=1, verify=True, timeout_s=TIMEOUT_S)
    after = _max_diff(ray, learner, worker, prompts, seed=2)
    print(f"\nLoRA: vLLM engine vs learner before sync {before:.2e}, after {after:.2e}; {sent.bytes} bytes")
    assert before > 1e-2 and after < 1e-4 and received.version == 1 and received.verify_s > 0

    ray.get(worker.alter_next_adapter.remote())
    with pytest.raises(WeightSyncMismatch, match=r"adapter_model\.safetensors: the engine's adapter file differs"):
        sync(ray, [learner], [worker], "lora", 2, bucket_mib=1, verify=True, timeout_s=TIMEOUT_S)
    assert _max_diff(ray, learner, worker, prompts, seed=3) > 1e-3  # the engine really serves the altered adapter
    for actor in (worker, learner):
        ray.kill(actor)
