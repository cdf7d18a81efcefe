"""Weight sync learner -> vLLM CPU engine in another process: collective (a gloo group, buckets;
rl/loop/weight_channel.py) with and without verification, against today's object-store path (FullWeights
pickled through Ray).

    python -m benchmarks.perf.weight_sync --out benchmarks/results/weight_sync/results.json   # SmolLM2-135M fp32
    python -m benchmarks.perf.weight_sync --smoke                                               # tiny-llama, 2 syncs

Two Ray actors, as `cluster: ray` places them: the learner (a real PolicyLearner, full fine-tuning) and one rollout
worker (rl.loop.worker.EngineWorker with rollout.backend=vllm). Each arm's time is the driver's wall time of one
whole sync (all calls issued, all answered). Object store, as RayWorkers.load_weights does it today: the driver
takes `learner.weights("full")` and hands it to the worker's `load_weights`. Arms alternate (A B C, C B A, ...);
one warm-up sync per arm first (it maps the shared buffer). Every setting lives in `Settings`, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from benchmarks._report import abba, emit, spread

ARMS = ("collective", "collective_verify", "object_store")


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    syncs: int = 8
    """Timed syncs per arm (the median is reported)."""
    bucket_mib: int = 256
    threads: int = 1
    """torch threads per actor (vLLM's CPU worker binds its own)."""
    ray_cpus: int = 2
    timeout_s: float = 600.0

    def job_overrides(self, run_dir: str) -> list[str]:
        return ["adapter=null", "rollout.backend=vllm", f"model.path={self.model}", f"model.dtype={self.dtype}",
                f"run_dir={run_dir}", "logging.progress=false", "logging.wandb.mode=disabled"]

def _learner_host(ray, factory, threads):
    """A one-rank SyncLearnerHost: the host starts empty and builds its learner in `build` (rl/loop/cluster.py)."""
    from rl.loop.weight_channel import SyncLearnerHost

    host = ray.remote(num_cpus=0)(SyncLearnerHost).remote(threads)
    ray.get(host.build.remote(factory, 0, 1, "", 0, "cpu", 60.0))
    return host



def _start(ray: Any, s: Settings, run_dir: str) -> tuple[Any, Any, Any]:
    from rl.config import load_job
    from rl.loop.learner import PolicyLearner
    from rl.loop.weight_channel import SyncRolloutHost, connect
    from rl.loop.worker import EngineWorker
    from rl.models import resolve_model

    job = load_job("quickstart", s.job_overrides(run_dir))
    model_dir = resolve_model(s.model)
    learner = _learner_host(ray, lambda: PolicyLearner(job, model_dir), s.threads)
    worker = ray.remote(num_cpus=0)(SyncRolloutHost).remote(lambda: EngineWorker(job, model_dir), s.threads)
    connect(ray, learner, [worker], "cpu", s.timeout_s)
    return job, learner, worker


def _one(ray: Any, arm: str, s: Settings, learner: Any, worker: Any, version: int) -> dict[str, Any]:
    from rl.loop.weight_channel import sync

    start = time.perf_counter()
    if arm == "object_store":
        weights = ray.get(learner.weights.remote("full"), timeout=s.timeout_s)
        engine_s = ray.get(worker.load_weights.remote(weights, version), timeout=s.timeout_s)
        seconds = time.perf_counter() - start
        # as it arrives here: a tied tensor (lm_head = embed_tokens) comes out of Ray as a copy of its own
        nbytes = sum(t.numel() * t.element_size() for t in weights.tensors.values())
        return {"seconds": seconds, "bytes": nbytes, "engine_s": engine_s}
    sent, (received,) = sync(ray, [learner], [worker], "full", version, s.bucket_mib, arm == "collective_verify",
                             s.timeout_s)
    return {"seconds": time.perf_counter() - start, "bytes": sent.bytes, "buckets": sent.buckets,
            "receiver_s": received.seconds, "receiver_verify_s": received.verify_s, "sender_verify_s": sent.verify_s,
            "path": received.path}


def run(s: Settings) -> dict[str, Any]:
    import tempfile

    import ray

    ray.init(num_cpus=s.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("PYTHONPATH", "HF_"))}})
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            _, learner, worker = _start(ray, s, run_dir)
            version = 0
            for arm in ARMS:  # warm-up: the first push maps the engine's shared buffer
                version += 1
                _one(ray, arm, s, learner, worker, version)
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
            for arm in abba(ARMS, s.syncs):
                version += 1
                runs[arm].append({**_one(ray, arm, s, learner, worker, version), "settings": dataclasses.asdict(s)})
    finally:
        ray.shutdown()
    return summarise(s, runs)


def summarise(s: Settings, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    settings = {str(r["settings"]) for rows in runs.values() for r in rows}  # one Settings for every row
    assert settings == {str(dataclasses.asdict(s))}, f"arms ran with different settings: {settings}"
    arms = {arm: {"seconds": spread([r["seconds"] for r in rows]),
                  **{key: spread([r[key] for r in rows]) for key in ("receiver_verify_s", "sender_verify_s")
                     if arm == "collective_verify"},
                  "rows": [{k: v for k, v in r.items() if k != "settings"} for r in rows]}
            for arm, rows in runs.items()}
    med = {arm: arms[arm]["seconds"]["median"] for arm in ARMS}
    verify_rows = runs["collective_verify"]
    return {
        "benchmark": "weight_sync", "settings": dataclasses.asdict(s),
        "bytes_per_sync": {arm: rows[0]["bytes"] for arm, rows in runs.items()},
        "median_s": med,
        "collective_over_object_store": med["collective"] / med["object_store"],
        "collective_verify_over_object_store": med["collective_verify"] / med["object_store"],
        "verify_overhead_of_sync": (med["collective_verify"] - med["collective"]) / med["collective"],
        "verify_share_of_verified_sync": spread([r["receiver_verify_s"] / r["seconds"] for r in verify_rows]),
        "goal": {"collective_under_0.5s": med["collective_verify"] < 0.5,
                 "at_most_half_of_object_store": med["collective_verify"] <= 0.5 * med["object_store"],
                 "verify_under_5pct": (med["collective_verify"] - med["collective"]) / med["collective"] < 0.05},
        "arms": arms, "load_avg_at_end": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny-llama, 2 syncs per arm: checks the script runs")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    s = Settings(model="tiny-llama", syncs=2) if args.smoke else Settings()
    emit(run(s), args.out)


if __name__ == "__main__":
    main()
