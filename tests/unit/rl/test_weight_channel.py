"""rl/loop/weight_channel.py and weight_wire.py without Ray: buckets, header, probes, and a real 2-rank gloo sync
(the two ranks as threads of this process: a weight-sync group is a stateless process-group object, not the default
group) into a real transformers engine, including one whose engine really ends up holding a wrong tensor."""

from __future__ import annotations

import pickle
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rl.loop.weight_channel import WeightGroup, WeightSyncMismatch, WeightSyncTimeout, receive_weights, send_weights
from rl.loop.weight_wire import (
    Bucket,
    SyncHeader,
    TensorSpec,
    flatten,
    mismatches,
    plan_buckets,
    probe,
    probe_vectors,
    unflatten,
)
from rl.types import FullWeights


def _specs(*items: tuple[str, str, tuple[int, ...]]) -> list[TensorSpec]:
    return [TensorSpec(n, d, s) for n, d, s in items]


def test_buckets_are_bounded_single_dtype_runs_in_send_order():
    specs = _specs(("a", "float32", (4,)), ("b", "float32", (4,)), ("c", "float32", (4,)),   # 16 bytes each
                   ("d", "bfloat16", (8,)), ("e", "float32", (20,)), ("f", "float32", (1,)))
    assert plan_buckets(specs, 32) == (Bucket(0, 2), Bucket(2, 3), Bucket(3, 4), Bucket(4, 5), Bucket(5, 6))
    assert plan_buckets(specs, 1 << 20) == (Bucket(0, 3), Bucket(3, 4), Bucket(4, 6))
    assert plan_buckets([], 32) == ()


def test_flatten_unflatten_round_trip_and_header_pickles():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    specs = [TensorSpec(f"t{i}", "float32", tuple(t.shape)) for i, t in enumerate(tensors)]
    back = unflatten(flatten(tensors), specs)
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))
    header = SyncHeader(3, "full", tuple(specs), plan_buckets(specs, 64), {"tied": "t0"}, True)
    assert pickle.loads(pickle.dumps(header)) == header
    assert header.nbytes == sum(t.numel() * 4 for t in tensors)


def test_probes_pass_float_noise_and_catch_swapped_or_missing_tensors():
    gen = torch.Generator().manual_seed(0)
    k, v, norm = (torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(16, generator=gen))
    specs = _specs(("k", "float32", (8, 16)), ("v", "float32", (8, 16)), ("norm", "float32", (16,)))
    vectors = probe_vectors(specs, seed=5)
    sent = {"k": probe(k, vectors), "v": probe(v, vectors), "norm": probe(norm, vectors)}
    noisy = {"k": probe(k * (1 + 1e-7), vectors), "v": probe(v, vectors), "norm": probe(norm, vectors)}
    assert mismatches(specs, sent, noisy) == []
    swapped = {"k": probe(v, vectors), "v": probe(k, vectors), "norm": probe(norm, vectors)}
    assert [line.split(":")[0] for line in mismatches(specs, sent, swapped)] == ["k", "v"]
    one_element = norm.clone()
    one_element[3] += 0.5
    problems = mismatches(specs, sent, {**sent, "norm": probe(one_element, vectors)})
    assert [line.split(":")[0] for line in problems] == ["norm"]
    assert "not held" in mismatches(specs, sent, {"k": sent["k"], "v": sent["v"]})[0]


def _run_pair(sender: Any, receiver: Any, timeout_s: float = 60.0) -> tuple[Any, Any]:
    """Rank 0 and rank 1 of one group as two threads; each side's result or exception."""
    store, address = WeightGroup.open(2, "cpu", timeout_s=timeout_s)
    out: dict[str, Any] = {}

    def run(side: str, fn: Any, rank: int) -> None:
        try:
            group = WeightGroup(address, rank, store if rank == 0 else None)
            out[side] = fn(group)
        except Exception as exc:  # noqa: BLE001 - handed back to the test thread
            out[side] = exc

    threads = [threading.Thread(target=run, args=("send", sender, 0)),
               threading.Thread(target=run, args=("recv", receiver, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out["send"], out["recv"]


def _engine(model_dir: str, engine_cls: type) -> Any:
    from rl.models import load_causal_lm, load_tokenizer

    return engine_cls(load_causal_lm(model_dir).eval().requires_grad_(False), load_tokenizer(model_dir))


def _trained(model_dir: str) -> dict[str, torch.Tensor]:
    """The tiny model's weights moved off its initial values (what a learner would send; tied ones stay tied)."""
    from rl.models import load_causal_lm

    model = load_causal_lm(model_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model.state_dict()


def test_two_rank_sync_loads_the_engine_and_verifies(tiny_model_dir):
    from rollout.hf_engine import HFEngine

    weights = _trained(tiny_model_dir)
    worker = SimpleNamespace(engine=_engine(tiny_model_dir, HFEngine), version=0)
    sent, received = _run_pair(lambda g: send_weights(g, FullWeights(weights), 7, bucket_bytes=64 << 10, verify=True),
                               lambda g: receive_weights(g, worker))
    assert not isinstance(received, Exception), received
    assert received.version == worker.version == worker.engine.policy_version == 7
    assert sent.buckets == received.buckets > 1 and sent.bytes == received.bytes
    held = worker.engine.model.state_dict()
    assert all(torch.equal(held[n], weights[n]) for n in weights)


class SwappingEngine:
    """A real transformers engine behind a name-mapping bug: layer 0's k_proj and v_proj land in each other's place
    (the same shape in this model), so the engine really holds wrong weights after loading."""

    def __new__(cls, model: torch.nn.Module, tokenizer: Any) -> Any:
        from rollout.hf_engine import HFEngine

        engine = HFEngine(model, tokenizer)
        real_push = engine.push_weights
        swap = {"model.layers.0.self_attn.k_proj.weight": "model.layers.0.self_attn.v_proj.weight",
                "model.layers.0.self_attn.v_proj.weight": "model.layers.0.self_attn.k_proj.weight"}
        engine.push_weights = lambda named, version: real_push(((swap.get(n, n), t) for n, t in named), version)
        return engine


def test_a_corrupted_sync_is_detected_and_names_the_tensor(tiny_model_dir):
    weights = _trained(tiny_model_dir)
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    assert weights[k].shape == weights[v].shape
    worker = SimpleNamespace(engine=_engine(tiny_model_dir, SwappingEngine), version=0)
    _, received = _run_pair(lambda g: send_weights(g, FullWeights(weights), 2, bucket_bytes=64 << 10, verify=True),
                            lambda g: receive_weights(g, worker))
    assert torch.equal(worker.engine.model.state_dict()[k], weights[v])  # the corruption is real
    assert isinstance(received, WeightSyncMismatch), received
    assert k in str(received) and v in str(received) and "2 tensor(s)" in str(received)


def test_without_verify_the_same_corruption_passes_silently(tiny_model_dir):
    """The check is what catches it (this test fails if verification were always on or the swap not real)."""
    weights = _trained(tiny_model_dir)
    worker = SimpleNamespace(engine=_engine(tiny_model_dir, SwappingEngine), version=0)
    _, received = _run_pair(lambda g: send_weights(g, FullWeights(weights), 2, bucket_bytes=64 << 10, verify=False),
                            lambda g: receive_weights(g, worker))
    assert not isinstance(received, Exception) and received.verify_s == 0.0


def test_a_member_that_never_joins_or_never_sends_times_out_with_a_clear_error():
    store, address = WeightGroup.open(2, "cpu", timeout_s=3.0)
    with pytest.raises(WeightSyncTimeout, match=r"rank 0 could not join the group .* within 3s"):
        WeightGroup(address, 0, store)  # rank 1 never joins

    worker = SimpleNamespace(engine=None, version=0)
    hung = lambda g: (time.sleep(6), g)  # noqa: E731 - rank 0 joins, holds the group, never sends
    _, received = _run_pair(hung, lambda g: receive_weights(g, worker), 3.0)
    assert isinstance(received, WeightSyncTimeout) and "rank 1 could not broadcast weights" in str(received)
    _, received = _run_pair(lambda g: None, lambda g: receive_weights(g, worker), 3.0)  # rank 0 gone at once
    assert isinstance(received, WeightSyncTimeout) and "died or hangs" in str(received)
