"""Process placement: where the learner and the rollout workers live (`cluster:` in the job).

`local`: plain objects in this process. `ray`: the learner and N rollout workers are Ray actors;
prompts are sharded by whole groups. The driver sees the same interface either way. Ray is imported
here and nowhere else.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.registries import CLUSTERS
from rl.types import Prompt, SamplingParams




class RolloutPool:
    """N rollout workers behind one `generate`; each worker gets whole prompts (so whole groups)."""

    def __init__(self, workers: Sequence[Any], call: Callable[..., Any]) -> None:
        self.workers = list(workers)
        self._call = call  # (worker, method, *args) -> result, local or remote

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        shards = _shard(list(prompts), len(self.workers))
        jobs = [(w, shard, _shard_params(params, i)) for i, (w, shard) in enumerate(zip(self.workers, shards)) if shard]
        results = self._call_many([(w, "generate", shard, p) for w, shard, p in jobs])
        return results[0] if len(results) == 1 else RolloutBatch.concat(results)

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        return self._call_many([(w, method, *args) for w in self.workers])

    def _call_many(self, calls: list[tuple]) -> list[Any]:
        many = getattr(self._call, "many", None)
        return many(calls) if many is not None else [self._call(*c) for c in calls]


def _shard(items: list, k: int) -> list[list]:
    per, extra = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + per + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _shard_params(params: SamplingParams, index: int) -> SamplingParams:
    """Distinct seeds per shard, so workers never draw the same samples."""
    from dataclasses import replace

    return replace(params, seed=params.seed * 1009 + index) if index else params


class Placement:
    """What `build_placement` returns: a learner handle, a rollout pool, and a closer."""

    def __init__(self, learner: Any, rollout: RolloutPool, close: Callable[[], None], remote: bool) -> None:
        self.learner, self.rollout, self.close, self.remote = learner, rollout, close, remote


@CLUSTERS.register("local")
def place_local(job: Any, make_learner: Callable[[], Any], make_worker: Callable[[Any], Any]) -> Placement:
    learner = make_learner()
    worker = make_worker(learner)
    return Placement(learner, RolloutPool([worker], _local_call), lambda: worker.close(), remote=False)


def _local_call(worker: Any, method: str, *args: Any) -> Any:
    return getattr(worker, method)(*args)


class _RemoteHandle:
    """Calls a hosted object's methods synchronously with a timeout: a dead or hung actor never hangs us."""

    def __init__(self, ray: Any, actor: Any, timeout_s: float) -> None:
        self._ray, self._actor, self._timeout_s = ray, actor, timeout_s

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            return self._ray.get(self._actor.call.remote(name, *args), timeout=self._timeout_s)

        return call


class _RayCaller:
    """Runs one method on several actors concurrently and waits for all (with the call timeout)."""

    def __init__(self, ray: Any, timeout_s: float) -> None:
        self.ray, self.timeout_s = ray, timeout_s

    def __call__(self, worker: Any, method: str, *args: Any) -> Any:
        return self.many([(worker, method, *args)])[0]

    def many(self, calls: list[tuple]) -> list[Any]:
        refs = [w.call.remote(m, *a) for w, m, *a in calls]
        return self.ray.get(refs, timeout=self.timeout_s)


class _ActorHost:
    """A Ray actor that builds one object (learner or rollout worker) and forwards calls to it."""

    def __init__(self, factory: Callable[[], Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.obj = factory()

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self.obj, name)(*args)


@CLUSTERS.register("ray")
def place_ray(job: Any, make_learner: Callable[[], Any], make_worker: Callable[[Any], Any]) -> Placement:
    import ray

    cfg = job.cluster
    _init_ray(ray, cfg)
    threads = max(1, torch_threads())
    host = ray.remote(num_cpus=0)(_ActorHost)
    learner_actor = host.remote(make_learner, threads)
    workers = [host.remote(lambda: make_worker(None), threads) for _ in range(cfg.rollout_workers)]

    def close() -> None:
        for actor in [learner_actor, *workers]:
            ray.kill(actor)

    learner = _RemoteHandle(ray, learner_actor, cfg.call_timeout_s)
    return Placement(learner, RolloutPool(workers, _RayCaller(ray, cfg.call_timeout_s)), close, remote=True)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _init_ray(ray: Any, cfg: Any) -> None:
    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "RLPOST", "TRANSFORMERS_", "VLLM_"))}
    try:
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus if cfg.address is None else None,
                 include_dashboard=False, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"could not start or join a Ray cluster (cluster.address={cfg.address!r}): {exc}. "
                        "Start one with `ray start --head`, or set cluster.address: null for a local one.") from None
