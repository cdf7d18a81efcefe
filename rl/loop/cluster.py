"""Process placement: where the learner and the rollout workers live (`cluster:` in the job).

`local`: plain objects in this process. `ray`: the learner's N ranks and the rollout workers are Ray actors
(placed by rl/loop/ray_placement.py); prompts are sharded by whole groups. The driver sees the same interface
either way. Ray is imported here and in ray_placement.py, and only inside functions (`rl --help` stays instant).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.loop import distributed
from rl.loop.ray_placement import Gang, check_fits, reserve_learners, reserve_rollout
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
    """What a cluster builder returns: a learner, a rollout pool, a closer, and (when the weights travel over a
    collective group rather than through `rollout.load_weights`) `sync(version) -> seconds`."""

    def __init__(self, learner: Learner, rollout: RolloutPool, close: Callable[[], None],
                 sync: Callable[[int], float] | None = None) -> None:
        self.learner, self.rollout, self.close, self.sync = learner, rollout, close, sync


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
class ActorPlacement(TypedDict):
    """What Ray granted an actor: its GPU ids (and the CUDA_VISIBLE_DEVICES Ray set from them), its placement
    group's hex id (None outside one), its node's IP and its process id."""

    gpu_ids: list[int | str]
    cuda_visible_devices: str | None
    placement_group: str | None
    node_ip: str
    pid: int


def _placement() -> ActorPlacement:
    import ray

    return {"gpu_ids": list(ray.get_gpu_ids()), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "placement_group": ray.get_runtime_context().get_placement_group_id(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


class LearnerHost:
    """One learner rank's actor (processes named `ray::LearnerHost`): joins the ranks' group, then builds the
    learner and exposes its methods. Built in two calls, `rendezvous` on rank 0 and `build` on every rank, because
    the group's address is rank 0's node, known only once Ray has placed it."""

    learner: Learner

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) for the group to meet at: this node's IP as Ray knows it, and a port free here now."""
        import ray

        from rl.loop.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def build(self, factory: Callable[[], Learner], rank: int, world_size: int, address: str, port: int,
              device: str, timeout_s: float) -> None:
        """Join the group as `rank` (blocks until every rank has arrived; one rank needs no group), then build."""
        if world_size > 1:
            from rl.loop.distributed import join_group
            from rl.loop.learner import pick_device

            join_group(rank, world_size, address, port, pick_device(device), timeout_s)
        self.learner = factory()

    def placement(self) -> ActorPlacement:
        return _placement()

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

    def placement(self) -> ActorPlacement:
        return _placement()

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


RemoteCall = Callable[["ActorHandle"], "ObjectRef"]
"""One call on one actor, e.g. `lambda actor: actor.sleep.remote()`."""

RESUME = "The run directory holds the last checkpoint: continue with `rl train --resume RUN_DIR`."
DEATH_GRACE_S = 10.0
"""After a rank's call fails, how long to wait for the others' to see whether one rank died (and caused it)."""


class RemoteLearner:
    """The `Learner` in N LearnerHost actors, ranks 0..N-1: every call goes to all ranks at once, with the same
    arguments (their collectives pair up), and returns rank 0's result, within the call timeout. A rank that dies
    or does not answer ends the run with a clear error naming it, never a hang: every rank is killed first (the
    others would wait in a collective until cluster.collective_timeout_s), and the last checkpoint stays."""

    def __init__(self, ray: ModuleType, actors: Sequence[ActorHandle], timeout_s: float) -> None:
        self._ray, self.actors, self._timeout_s = ray, list(actors), timeout_s

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self._call("train_step", lambda actor: actor.train_step.remote(batch))

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self._call("logprobs", lambda actor: actor.logprobs.remote(batch))

    def weights(self, mode: SyncMode) -> WeightSync:
        return self._call("weights", lambda actor: actor.weights.remote(mode))

    def save_policy(self, checkpoint_dir: str) -> dict[str, object]:
        return self._call("save_policy", lambda actor: actor.save_policy.remote(checkpoint_dir))

    def load_policy(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        self._call("load_policy", lambda actor: actor.load_policy.remote(checkpoint_dir, trainer_state))

    def export(self, out_dir: str) -> None:
        self._call("export", lambda actor: actor.export.remote(out_dir))

    def _call(self, method: str, issue: RemoteCall) -> Any:
        """Rank 0's result of `issue` sent to every rank; `method` names the call in the error only."""
        return self.gather(method, [issue(actor) for actor in self.actors])[0]

    def gather(self, method: str, refs: Sequence[ObjectRef]) -> list[Any]:
        """The results of calls already issued, `refs[i]` on rank i, in rank order; waits at most the timeout."""
        deadline = time.monotonic() + self._timeout_s
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        while pending:
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._fail(sorted(pending.values()), f"did not answer {method}() within {self._timeout_s:.0f}s "
                           "(cluster.call_timeout_s)")
            rank = pending.pop(ready[0])
            try:
                results[rank] = self._ray.get(ready[0])
            except self._ray.exceptions.RayActorError:
                self._fail([rank], f"died during {method}()")
            except self._ray.exceptions.RayTaskError:
                # A rank's own error (a bug, or a collective that broke because a peer died): a dead peer is
                # the cause to name; otherwise the error goes up as it is, with its traceback.
                if dead := self._dead(pending):
                    self._fail(dead, f"died during {method}()")
                self.kill()
                raise
        return [results[rank] for rank in range(len(refs))]

    def _dead(self, pending: Mapping[ObjectRef, int]) -> list[int]:
        """Ranks among `pending` whose actor has died, as far as DEATH_GRACE_S shows."""
        ready, _ = self._ray.wait(list(pending), num_returns=len(pending), timeout=DEATH_GRACE_S)
        dead = []
        for ref in ready:
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayActorError:
                dead.append(pending[ref])
            except self._ray.exceptions.RayTaskError:
                continue  # failed too, alive: not the cause
        return sorted(dead)

    def _fail(self, ranks: Sequence[int], what: str) -> None:
        self.kill()
        who = f"learner rank {ranks[0]}" if len(ranks) == 1 else f"learner ranks {', '.join(map(str, ranks))}"
        raise UserError(f"{who} (of {len(self.actors)}) {what}; every learner rank was stopped. {RESUME}")

    def kill(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)


class RayWorkers:
    """Rollout-worker actors (a `WorkerGroup`). A worker that dies (or exceeds the call timeout) is replaced by
    a new one in its place (`spawn(i)`: the same resources), which first receives the newest weights, and its
    share of the call is issued again."""

    def __init__(self, ray: ModuleType, spawn: Callable[[int], ActorHandle], size: int, timeout_s: float) -> None:
        self.ray, self._spawn, self.size, self.timeout_s = ray, spawn, size, timeout_s
        self.actors = [spawn(index) for index in range(size)]
        self.restarts = 0
        self._last_sync: tuple[WeightSync, int] | None = None
        self.on_restart: Callable[[int], None] | None = None  # a collective sync re-forms its group (weight_channel)

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
        self.actors[index] = self._spawn(index)
        self.restarts += 1
        if self._last_sync is not None:
            sync, version = self._last_sync
            self.ray.get(self.actors[index].load_weights.remote(sync, version), timeout=self.timeout_s)
        if self.on_restart is not None:
            self.on_restart(index)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _generate_call(shard: Sequence[Prompt], params: SamplingParams) -> RemoteCall:
    return lambda actor: actor.generate.remote(shard, params)


def _init_ray(ray: ModuleType, cfg: RayCluster) -> None:
    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "RLPOST", "TRANSFORMERS_", "VLLM_"))}
    local = cfg.address is None  # what a joined cluster has is its own (`ray start --num-cpus/--num-gpus`)
    try:
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus if local else None,
                 num_gpus=cfg.num_gpus if local else None, include_dashboard=False, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"could not start or join a Ray cluster (cluster.address={cfg.address!r}): {exc}. "
                        "Start one with `ray start --head`, or set cluster.address: null for a local one.") from None


def _start_learners(ray: ModuleType, job: JobConfig, cfg: RayCluster, make_learner: MakeLearner, gang: Gang,
                    threads: int, host_class: type[LearnerHost]) -> tuple[RemoteLearner, list[ObjectRef]]:
    """The learner ranks' actors, one per bundle of `gang`, and their `build` calls, issued to every rank at once
    (each blocks in the group's rendezvous until all have arrived): collect them with `gather`."""
    host = ray.remote(host_class)
    actors = [host.options(**gang.options(rank)).remote(threads) for rank in range(cfg.learners)]
    group = RemoteLearner(ray, actors, cfg.call_timeout_s)
    address, port = group.gather("rendezvous", [actors[0].rendezvous.remote()])[0]
    building = [actor.build.remote(make_learner, rank, cfg.learners, address, port, job.trainer.device,
                                   cfg.collective_timeout_s) for rank, actor in enumerate(actors)]
    return group, building


@CLUSTERS.register("ray")
def place_ray(job: JobConfig, make_learner: MakeLearner, make_worker: MakeWorker) -> Placement:
    """Learner ranks and rollout workers as actors with the resources of `cluster.resources` (see
    rl/loop/ray_placement.py for where Ray puts them); started together, so their models load in parallel."""
    import ray

    from rl.config.job import RayCluster

    cfg = job.cluster
    if not isinstance(cfg, RayCluster):  # CLUSTERS is keyed by cluster.name: this is the `ray` section
        raise TypeError(f"cluster {cfg.name!r} is not a RayCluster section")
    _init_ray(ray, cfg)
    check_fits(ray, cfg)
    gangs = [reserve_learners(ray, cfg)]
    closers: list[Callable[[], None]] = [gangs[0].remove]

    def close() -> None:
        for closer in reversed(closers):
            closer()

    try:
        gangs.append(reserve_rollout(ray, cfg))
        closers.append(gangs[1].remove)
        threads = torch.get_num_threads()
        collective = cfg.weight_sync.transport == "collective"
        learner_class, rollout_class = _host_classes(collective)
        learner, building = _start_learners(ray, job, cfg, make_learner, gangs[0], threads, learner_class)
        closers.append(learner.kill)
        rollout_host = ray.remote(rollout_class)

        def spawn(index: int) -> ActorHandle[RolloutHost]:
            # ray types `.remote()` as ActorHandle[T] | type[T] (its ActorProxy, for method typing); it is the handle
            return rollout_host.options(**gangs[1].options(index)).remote(  # type: ignore[return-value]
                lambda: make_worker(None), threads)

        workers = RayWorkers(ray, spawn, cfg.rollout_workers, cfg.call_timeout_s)
        closers.append(workers.close)
        learner.gather("build", building)
    except BaseException:
        close()
        raise
    return Placement(learner, RolloutPool(workers), close, sync=_collective_sync(ray, learner, workers, job)
                     if collective else None)


def _host_classes(collective: bool) -> tuple[type[LearnerHost], type[RolloutHost]]:
    """The actor classes: with `weight_sync.transport: collective`, hosts that also join the weight-sync group."""
    if not collective:
        return LearnerHost, RolloutHost
    from rl.loop.weight_channel import SyncLearnerHost, SyncRolloutHost  # it builds on this module's hosts

    return SyncLearnerHost, SyncRolloutHost


def _collective_sync(ray: ModuleType, learner: RemoteLearner, workers: RayWorkers,
                     job: JobConfig) -> Callable[[int], float]:
    from rl.loop.weight_channel import CollectiveSync

    return CollectiveSync(ray, learner, workers, job)
