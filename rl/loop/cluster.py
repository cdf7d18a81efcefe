"""Process placement: where the learner and the rollout workers live (`cluster:` in the job).

`local`: plain objects in this process. `ray`: the learner and N rollout workers are Ray actors;
prompts are sharded by whole groups. The driver sees the same interface either way. Ray is imported
here and nowhere else.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.registries import CLUSTERS
from rl.types import Prompt, SamplingParams

log = logging.getLogger(__name__)


class LocalWorkers:
    """Workers as plain objects in this process."""

    def __init__(self, workers: Sequence[Any]) -> None:
        self.workers = list(workers)
        self.size = len(self.workers)

    def call_many(self, method: str, args: Sequence[tuple | None]) -> list[Any]:
        return [None if a is None else getattr(w, method)(*a) for w, a in zip(self.workers, args)]

    def close(self) -> None:
        for w in self.workers:
            w.close()


class RolloutPool:
    """N rollout workers behind one `generate`; each worker gets whole prompts (so whole groups)."""

    def __init__(self, workers: Any) -> None:
        self.workers = workers

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        shards = _shard(list(prompts), self.workers.size)
        # Seeds derive from each prompt's id (rollout/engine.py), so sharding does not change the samples.
        args = [(s, params) if s else None for s in shards]
        results = [r for r in self.workers.call_many("generate", args) if r is not None]
        return results[0] if len(results) == 1 else RolloutBatch.concat(results)

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        return self.workers.call_many(method, [args] * self.workers.size)


def _shard(items: list, k: int) -> list[list]:
    per, extra = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + per + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class Placement:
    """What a cluster builder returns: a learner handle, a rollout pool, and a closer."""

    def __init__(self, learner: Any, rollout: RolloutPool, close: Callable[[], None]) -> None:
        self.learner, self.rollout, self.close = learner, rollout, close


@CLUSTERS.register("local")
def place_local(job: Any, make_learner: Callable[[], Any], make_worker: Callable[[Any], Any]) -> Placement:
    learner = make_learner()
    workers = LocalWorkers([make_worker(learner)])
    return Placement(learner, RolloutPool(workers), workers.close)


# ----- Ray -----------------------------------------------------------------------------------
class _ActorHost:
    """A Ray actor that builds one object (learner or rollout worker) and forwards calls to it."""

    def __init__(self, factory: Callable[[], Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.obj = factory()

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self.obj, name)(*args)



class LearnerHost(_ActorHost):
    """The learner's actor (a distinct class so its processes are named `ray::LearnerHost`)."""


class RolloutHost(_ActorHost):
    """A rollout worker's actor (processes named `ray::RolloutHost`)."""


class _RemoteHandle:
    """Calls a hosted object's methods synchronously with a timeout: a dead or hung actor never hangs us."""

    def __init__(self, ray: Any, actor: Any, timeout_s: float, what: str) -> None:
        self._ray, self._actor, self._timeout_s, self._what = ray, actor, timeout_s, what

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            try:
                return self._ray.get(self._actor.call.remote(name, *args), timeout=self._timeout_s)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError) as exc:
                raise UserError(f"the {self._what} actor died or did not answer {name}() within "
                                f"{self._timeout_s:.0f}s ({type(exc).__name__}). The run directory holds the "
                                "last checkpoint: continue with `rl train --resume RUN_DIR`.") from None

        return call


class RayWorkers:
    """Rollout-worker actors. A worker that dies (or exceeds the call timeout) is replaced by a new
    one, which first receives the newest weights, and its share of the call is issued again."""

    def __init__(self, ray: Any, spawn: Callable[[], Any], size: int, timeout_s: float) -> None:
        self.ray, self._spawn, self.size, self.timeout_s = ray, spawn, size, timeout_s
        self.actors = [spawn() for _ in range(size)]
        self.restarts = 0
        self._last_load: tuple | None = None

    def call_many(self, method: str, args: Sequence[tuple | None]) -> list[Any]:
        refs = [None if a is None else actor.call.remote(method, *a) for actor, a in zip(self.actors, args)]
        results = [self._result(i, ref, method, args[i]) for i, ref in enumerate(refs)]
        if method == "load":
            self._last_load = args[0]
        return results

    def _result(self, index: int, ref: Any, method: str, args: tuple | None) -> Any:
        if ref is None:
            return None
        errors = (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError)
        try:
            return self.ray.get(ref, timeout=self.timeout_s)
        except errors as exc:
            log.warning("rollout worker %d failed in %s() (%s); restarting it and re-issuing its prompts",
                        index, method, type(exc).__name__)
            self._restart(index)
            return self.ray.get(self.actors[index].call.remote(method, *args), timeout=self.timeout_s)

    def _restart(self, index: int) -> None:
        self.ray.kill(self.actors[index])
        self.actors[index] = self._spawn()
        self.restarts += 1
        if self._last_load is not None:
            self.ray.get(self.actors[index].call.remote("load", *self._last_load), timeout=self.timeout_s)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


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


@CLUSTERS.register("ray")
def place_ray(job: Any, make_learner: Callable[[], Any], make_worker: Callable[[Any], Any]) -> Placement:
    import ray
    import torch

    cfg = job.cluster
    _init_ray(ray, cfg)
    threads = torch.get_num_threads()
    # Actors take no Ray CPU slot: torch threads are set explicitly, and the learner and the workers
    # take turns in sync mode, so reserving slots would only stop small machines from scheduling them.
    learner_actor = ray.remote(num_cpus=0)(LearnerHost).remote(make_learner, threads)
    rollout_host = ray.remote(num_cpus=0)(RolloutHost)
    workers = RayWorkers(ray, lambda: rollout_host.remote(lambda: make_worker(None), threads),
                         cfg.rollout_workers, cfg.call_timeout_s)

    def close() -> None:
        workers.close()
        ray.kill(learner_actor)

    learner = _RemoteHandle(ray, learner_actor, cfg.call_timeout_s, "learner")
    return Placement(learner, RolloutPool(workers), close)
