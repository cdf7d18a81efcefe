"""Process placement: where the learner and the rollout workers live (`cluster:` in the job).

`local`: plain objects in this process. `ray`: the learner and N rollout workers are Ray actors;
prompts are sharded by whole groups. The driver sees the same interface either way. Ray is imported
here and nowhere else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.loop import distributed
from rl.registries import CLUSTERS
from rl.types import Learner, Prompt, RolloutWorker, SamplingParams, SyncMode, WeightSync

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from rl.config.job import JobConfig, RayCluster
    from rl.loop.learner import PolicyLearner

    MakeLearner = Callable[[], PolicyLearner]
    MakeWorker = Callable[[PolicyLearner | None], RolloutWorker]

log = logging.getLogger(__name__)


class WorkerGroup(Protocol):
    """N rollout workers called together: `generate` gives worker i shard i (an empty shard: no call), the other
    methods go to every worker."""

    size: int

    def generate(self, shards: Sequence[Sequence[Prompt]], params: SamplingParams) -> list[RolloutBatch]:
        """One batch per non-empty shard, in worker order."""
        ...

    def load_weights(self, sync: WeightSync, version: int) -> list[float]: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class LocalWorkers:
    """Workers as plain objects in this process."""

    def __init__(self, workers: Sequence[RolloutWorker]) -> None:
        self.workers = list(workers)
        self.size = len(self.workers)

    def generate(self, shards: Sequence[Sequence[Prompt]], params: SamplingParams) -> list[RolloutBatch]:
        return [w.generate(s, params) for w, s in zip(self.workers, shards) if s]

    def load_weights(self, sync: WeightSync, version: int) -> list[float]:
        return [w.load_weights(sync, version) for w in self.workers]

    def sleep(self) -> None:
        for w in self.workers:
            w.sleep()

    def wake(self) -> None:
        for w in self.workers:
            w.wake()

    def close(self) -> None:
        for w in self.workers:
            w.close()


class RolloutPool:
    """N rollout workers behind one `RolloutWorker`; each worker gets whole prompts (so whole groups)."""

    def __init__(self, workers: WorkerGroup) -> None:
        self.workers = workers

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        # Seeds derive from each prompt's id (rollout/engine.py), so sharding does not change the samples.
        results = self.workers.generate(_shard(list(prompts), self.workers.size), params)
        return results[0] if len(results) == 1 else RolloutBatch.concat(results)

    def load_weights(self, sync: WeightSync, version: int) -> float:
        """Every worker serves `sync` as `version`; the slowest worker's seconds."""
        return max(self.workers.load_weights(sync, version), default=0.0)

    def sleep(self) -> None:
        self.workers.sleep()

    def wake(self) -> None:
        self.workers.wake()

    def close(self) -> None:
        self.workers.close()


T = TypeVar("T")


def _shard(items: list[T], k: int) -> list[list[T]]:
    per, extra = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + per + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class Placement:
    """What a cluster builder returns: a learner, a rollout pool, and a closer."""

    def __init__(self, learner: Learner, rollout: RolloutPool, close: Callable[[], None]) -> None:
        self.learner, self.rollout, self.close = learner, rollout, close


@CLUSTERS.register("local")
def place_local(job: JobConfig, make_learner: MakeLearner, make_worker: MakeWorker) -> Placement:
    if job.cluster.learners == 1 and distributed.launched() is None:
        learner = make_learner()
        workers = LocalWorkers([make_worker(learner)])
        return Placement(learner, RolloutPool(workers), workers.close)
    # N ranks: this process is rank 0 (the driver); the others are started here or by torchrun/srun
    launch = distributed.launched()
    ranked = (distributed.join_launch(job, make_learner, launch) if launch is not None
              else distributed.start_local_ranks(job, make_learner))
    workers = LocalWorkers([make_worker(None)])  # the engine samples from a copy: sharded weights are synced

    def close() -> None:
        try:
            workers.close()
        finally:
            ranked.close()

    return Placement(ranked, RolloutPool(workers), close)


# ----- Ray -----------------------------------------------------------------------------------
# The actors host the objects and forward typed calls to them: `actor.generate.remote(...)`, never a method name.
class LearnerHost:
    """The learner's actor (processes named `ray::LearnerHost`): builds the learner and exposes its methods."""

    def __init__(self, factory: Callable[[], Learner], threads: int) -> None:
        torch.set_num_threads(threads)
        self.learner = factory()

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self.learner.train_step(batch)

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self.learner.logprobs(batch)

    def weights(self, mode: SyncMode) -> WeightSync:
        return self.learner.weights(mode)

    def save_policy(self, checkpoint_dir: str) -> dict[str, object]:
        return self.learner.save_policy(checkpoint_dir)

    def load_policy(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        self.learner.load_policy(checkpoint_dir, trainer_state)

    def export(self, out_dir: str) -> None:
        self.learner.export(out_dir)


class RolloutHost:
    """A rollout worker's actor (processes named `ray::RolloutHost`): builds the worker and exposes its methods."""

    def __init__(self, factory: Callable[[], RolloutWorker], threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker = factory()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        return self.worker.generate(prompts, params)

    def load_weights(self, sync: WeightSync, version: int) -> float:
        return self.worker.load_weights(sync, version)

    def sleep(self) -> None:
        self.worker.sleep()

    def wake(self) -> None:
        self.worker.wake()

    def close(self) -> None:
        self.worker.close()


class RemoteLearner:
    """The `Learner` in a LearnerHost actor, called synchronously with a timeout: a dead or hung actor never
    hangs us, it ends the run with a clear error (the last checkpoint stays)."""

    def __init__(self, ray: ModuleType, actor: ActorHandle, timeout_s: float) -> None:
        self._ray, self._actor, self._timeout_s = ray, actor, timeout_s

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self._call("train_step", lambda: self._actor.train_step.remote(batch))

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self._call("logprobs", lambda: self._actor.logprobs.remote(batch))

    def weights(self, mode: SyncMode) -> WeightSync:
        return self._call("weights", lambda: self._actor.weights.remote(mode))

    def save_policy(self, checkpoint_dir: str) -> dict[str, object]:
        return self._call("save_policy", lambda: self._actor.save_policy.remote(checkpoint_dir))

    def load_policy(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        self._call("load_policy", lambda: self._actor.load_policy.remote(checkpoint_dir, trainer_state))

    def export(self, out_dir: str) -> None:
        self._call("export", lambda: self._actor.export.remote(out_dir))

    def _call(self, method: str, issue: Callable[[], ObjectRef]) -> Any:
        """`issue()`'s result; `method` names the call in the error only."""
        try:
            return self._ray.get(issue(), timeout=self._timeout_s)
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError) as exc:
            raise UserError(f"the learner actor died or did not answer {method}() within "
                            f"{self._timeout_s:.0f}s ({type(exc).__name__}). The run directory holds the "
                            "last checkpoint: continue with `rl train --resume RUN_DIR`.") from None


RemoteCall = Callable[["ActorHandle"], "ObjectRef"]
"""One call on one RolloutHost actor, e.g. `lambda actor: actor.sleep.remote()`."""


class RayWorkers:
    """Rollout-worker actors (a `WorkerGroup`). A worker that dies (or exceeds the call timeout) is replaced by
    a new one, which first receives the newest weights, and its share of the call is issued again."""

    def __init__(self, ray: ModuleType, spawn: Callable[[], ActorHandle], size: int, timeout_s: float) -> None:
        self.ray, self._spawn, self.size, self.timeout_s = ray, spawn, size, timeout_s
        self.actors = [spawn() for _ in range(size)]
        self.restarts = 0
        self._last_sync: tuple[WeightSync, int] | None = None

    def generate(self, shards: Sequence[Sequence[Prompt]], params: SamplingParams) -> list[RolloutBatch]:
        calls = [_generate_call(s, params) if s else None for s in shards]
        return [r for r in self._call_each(calls, "generate") if r is not None]

    def load_weights(self, sync: WeightSync, version: int) -> list[float]:
        seconds = self._call_each([lambda actor: actor.load_weights.remote(sync, version)] * self.size,
                                  "load_weights")
        self._last_sync = (sync, version)
        return seconds

    def sleep(self) -> None:
        self._call_each([lambda actor: actor.sleep.remote()] * self.size, "sleep")

    def wake(self) -> None:
        self._call_each([lambda actor: actor.wake.remote()] * self.size, "wake")

    def _call_each(self, calls: Sequence[RemoteCall | None], what: str) -> list[Any]:
        """Issue every worker's call first (they run in parallel), then collect them in order."""
        refs = [None if c is None else c(actor) for actor, c in zip(self.actors, calls)]
        return [self._result(i, ref, calls[i], what) for i, ref in enumerate(refs)]

    def _result(self, index: int, ref: ObjectRef | None, call: RemoteCall | None, what: str) -> Any:
        if ref is None or call is None:
            return None
        errors = (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError)
        try:
            return self.ray.get(ref, timeout=self.timeout_s)
        except errors as exc:
            log.warning("rollout worker %d failed in %s() (%s); restarting it and re-issuing its prompts",
                        index, what, type(exc).__name__)
            self._restart(index)
            return self.ray.get(call(self.actors[index]), timeout=self.timeout_s)

    def _restart(self, index: int) -> None:
        self.ray.kill(self.actors[index])
        self.actors[index] = self._spawn()
        self.restarts += 1
        if self._last_sync is not None:
            sync, version = self._last_sync
            self.ray.get(self.actors[index].load_weights.remote(sync, version), timeout=self.timeout_s)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _generate_call(shard: Sequence[Prompt], params: SamplingParams) -> RemoteCall:
    return lambda actor: actor.generate.remote(shard, params)


def _init_ray(ray: ModuleType, cfg: RayCluster) -> None:
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
def place_ray(job: JobConfig, make_learner: MakeLearner, make_worker: MakeWorker) -> Placement:
    import ray

    from rl.config.job import RayCluster

    cfg = job.cluster
    if not isinstance(cfg, RayCluster):  # CLUSTERS is keyed by cluster.name: this is the `ray` section
        raise TypeError(f"cluster {cfg.name!r} is not a RayCluster section")
    _init_ray(ray, cfg)
    threads = torch.get_num_threads()
    # Actors take no Ray CPU slot: torch threads are set explicitly, and the learner and the workers
    # take turns in sync mode, so reserving slots would only stop small machines from scheduling them.
    # ray types `.remote()` as ActorHandle[T] | type[T] (its ActorProxy, for method typing); it returns the handle
    learner_host = ray.remote(num_cpus=0)(LearnerHost)
    learner_actor: ActorHandle[LearnerHost] = learner_host.remote(make_learner, threads)  # type: ignore[assignment]
    rollout_host = ray.remote(num_cpus=0)(RolloutHost)

    def spawn() -> ActorHandle[RolloutHost]:
        return rollout_host.remote(lambda: make_worker(None), threads)  # type: ignore[return-value]  # as above

    workers = RayWorkers(ray, spawn, cfg.rollout_workers, cfg.call_timeout_s)

    def close() -> None:
        workers.close()
        ray.kill(learner_actor)

    learner = RemoteLearner(ray, learner_actor, cfg.call_timeout_s)
    return Placement(learner, RolloutPool(workers), close)
