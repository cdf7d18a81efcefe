"""The learner's process group: N ranks (`cluster.learners`), one torch.distributed group, one sharded policy.

Every rank runs the same learner methods in the same order (their collectives pair up). How the calls reach
the ranks depends on the placement:

    local / torchrun / srun:  rank 0 is the driver; each call is posted on the group's TCPStore and run by
                              every rank (`RankedLearner` on rank 0, `serve` on the others)
    ray:                      the driver calls every rank's actor (rl/loop/cluster.py)

Ranks 1..N-1 are processes this module starts (`cluster: local`) or the other processes of a torchrun/srun
launch (RANK and WORLD_SIZE in the environment). Every collective has the group's timeout, so a rank that dies
ends the run with a message and a resumable run directory, never a hang.
"""

from __future__ import annotations

import copyreg
import io
import logging
import multiprocessing
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.types import SyncMode, WeightSync

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.loop.learner import PolicyLearner

log = logging.getLogger(__name__)
POLL_S = 5.0  # how often an idle rank checks that the driver is still there


def backend_for(device: str) -> str:
    """NCCL between GPUs, gloo between CPU processes (torch's two production backends)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def join_group(rank: int, world_size: int, address: str, port: int, device: str, timeout_s: float,
               store_is_external: bool = False) -> dist.Store:
    """Join the learner group at address:port as `rank` of `world_size`; returns the group's store (its command
    channel on the local placement). Rank 0 hosts the store unless a launcher already does
    (`store_is_external`: torchrun's agent store). `timeout_s` bounds every collective and store wait."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0 and not store_is_external,
                          timeout=timeout, wait_for_workers=False)
    dist.init_process_group(backend_for(device), store=dist.PrefixStore("rlpost/pg", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    return store


def world() -> tuple[int, int]:
    """(rank, world size) of this process in the learner group; (0, 1) without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it), for a rendezvous that starts right away."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_address() -> str:
    """This host's address as other hosts reach it (the resolved hostname; Ray placement uses Ray's node IP)."""
    return socket.gethostbyname(socket.gethostname())


def leave_group() -> None:
    """Leave cleanly: a barrier first, since gloo can abort a rank that tears down while a peer still sends."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# ----- a launcher's ranks (torchrun, srun) --------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun/srun launch (from the environment the launcher set)."""

    rank: int
    world_size: int
    local_rank: int
    address: str
    port: int
    agent_store: bool  # torchrun's agent already hosts the TCPStore at address:port


def launched() -> Launch | None:
    """This process's launch, or None when no launcher started it (one process, or the local placement)."""
    env = os.environ
    rank, size = env.get("RANK", env.get("SLURM_PROCID")), env.get("WORLD_SIZE", env.get("SLURM_NTASKS"))
    if rank is None or size is None or int(size) < 2:
        return None
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise UserError(f"this process is rank {rank} of {size} (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS "
                        "are set) but MASTER_ADDR and MASTER_PORT are not: torchrun sets them; under srun export "
                        "MASTER_ADDR=<first node's hostname> and MASTER_PORT=<a free port> in the batch script.")
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    return Launch(int(rank), int(size), int(local), env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                  agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def check_launch(job: JobConfig, launch: Launch) -> None:
    if job.cluster.name != "local" or job.cluster.learners != launch.world_size:
        raise UserError(f"the launcher started {launch.world_size} processes (WORLD_SIZE) but the job has cluster "
                        f"{job.cluster.name!r} with learners={job.cluster.learners}: pass cluster.name=local "
                        f"cluster.learners={launch.world_size} (one learner rank per launched process).")


def rank_device(job: JobConfig, local_rank: int) -> str:
    """This rank's device: its own GPU (cuda:LOCAL_RANK) with CUDA, else the CPU."""
    from rl.loop.learner import pick_device

    device = pick_device(job.trainer.device)
    return f"cuda:{local_rank}" if device == "cuda" else device


# ----- the command channel ------------------------------------------------------------------------
Method = Literal["train_step", "logprobs", "weights", "save_policy", "load_policy", "export", "stop"]


@dataclass(frozen=True)
class Command:
    """One learner call, posted by rank 0 for every rank (the wire type of the channel)."""

    seq: int
    method: Method
    args: tuple[Any, ...] = ()  # the learner method's own arguments (a batch, a sync mode, a state dict...)


def _run(learner: PolicyLearner, cmd: Command) -> object:
    """Run `cmd` on this rank's learner: the one table of what a command does."""
    table: dict[Method, Callable[..., object]] = {
        "train_step": learner.train_step, "logprobs": learner.logprobs, "weights": learner.weights,
        "save_policy": learner.save_policy, "load_policy": learner.load_policy,
        "export": learner.export}
    return table[cmd.method](*cmd.args)


def _dumps(obj: object) -> bytes:
    """Pickle with read-only mappings (a Prompt's metadata, rl/types.py) pickled as their dict contents: the
    standard pickler refuses mappingproxy (Ray's cloudpickle does not)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, MappingProxyType: _reduce_mappingproxy}
    pickler.dump(obj)
    return buffer.getvalue()


def _reduce_mappingproxy(m: MappingProxyType) -> tuple[Callable[[dict], MappingProxyType], tuple[dict]]:
    return _mappingproxy, (dict(m),)


def _mappingproxy(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


class Channel:
    """Commands from rank 0 to the other ranks through the group's TCPStore, one key per command.

    A store, not a collective, carries them: between two commands the driver may generate for minutes, longer
    than any sensible collective timeout, and an idle rank must notice the driver is gone (the store's host).
    """

    def __init__(self, store: dist.Store) -> None:
        self.store = dist.PrefixStore("rlpost/cmd", store)
        self.seq = 0

    def post(self, method: Method, args: tuple[Any, ...]) -> Command:
        cmd = Command(self.seq + 1, method, args)
        # nothing is posted when the arguments do not pickle; torch's stub says str, the store takes bytes
        self.store.set(str(cmd.seq), _dumps(cmd))  # type: ignore[arg-type]
        self.seq = cmd.seq
        if cmd.seq > 2:  # every rank has run command seq-1 (it was collective), so has read seq-2
            self.store.delete_key(str(cmd.seq - 2))
        return cmd

    def next(self, alive: Callable[[], bool]) -> Command:
        """The next command (blocking); raises ConnectionError when the driver is gone."""
        self.seq += 1
        key, idle = str(self.seq), time.monotonic()
        while True:
            try:
                if self.store.check([key]):  # a poll, not store.wait: c10d logs a warning per timed-out wait
                    return pickle.loads(self.store.get(key))
            except dist.DistError as exc:  # the store's host (rank 0) is gone
                raise ConnectionError(f"the driver (rank 0) is gone: {exc}") from None
            if time.monotonic() - idle > POLL_S:
                if not alive():
                    raise ConnectionError("the driver (rank 0) is gone")
                idle = time.monotonic()
            time.sleep(0.01)


def serve(learner: PolicyLearner, channel: Channel, alive: Callable[[], bool] = lambda: True) -> None:
    """A follower rank's loop: run every command rank 0 posts until `stop`."""
    while True:
        cmd = channel.next(alive)
        if cmd.method == "stop":
            return
        _run(learner, cmd)


class RankedLearner:
    """Rank 0's `Learner`: every call is posted to the other ranks, then run here; rank 0's result is the
    group's. A rank that dies or times out ends the run with a `UserError` (the last checkpoint stays)."""

    def __init__(self, learner: PolicyLearner, channel: Channel, ranks: LocalRanks | None) -> None:
        self.learner, self.channel, self.ranks = learner, channel, ranks
        self.broken = False  # a call failed part-way: the other ranks may be stuck in one of its collectives

    def _call(self, method: Method, *args: Any) -> Any:
        self._check_ranks(method)
        cmd = self.channel.post(method, args)
        try:
            return _run(self.learner, cmd)
        except BaseException as exc:
            self.broken = True
            if not isinstance(exc, (RuntimeError, dist.DistError)):
                raise
            self._check_ranks(method)
            raise UserError(f"a learner rank failed during {method}() ({type(exc).__name__}: {str(exc)[:200]}). "
                            "The run directory holds the last checkpoint: continue with "
                            "`rl train --resume RUN_DIR`.") from None

    def _check_ranks(self, method: str) -> None:
        dead = self.ranks.dead() if self.ranks is not None else []
        if dead:
            rank, code = dead[0]
            raise UserError(f"learner rank {rank} exited (exit code {code}) before {method}(): the run stops. The "
                            "run directory holds the last checkpoint: continue with `rl train --resume RUN_DIR`.")

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self._call("train_step", batch)

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self._call("logprobs", batch)

    def weights(self, mode: SyncMode) -> WeightSync:
        return self._call("weights", mode)

    def save_policy(self, checkpoint_dir: str) -> dict[str, object]:
        return self._call("save_policy", checkpoint_dir)

    def load_policy(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        self._call("load_policy", checkpoint_dir, trainer_state)

    def export(self, out_dir: str) -> None:
        self._call("export", out_dir)

    def close(self) -> None:
        """Stop the other ranks and leave the group; ranks this process started are reaped."""
        healthy = not self.broken and (self.ranks is None or not self.ranks.dead())
        try:
            if healthy:
                self.channel.post("stop", ())
                leave_group()
        finally:
            if self.ranks is not None:
                self.ranks.reap(30.0 if healthy else 0.0)  # a broken group's ranks wait in a collective: kill them


# ----- ranks started here (cluster: local) ----------------------------------------------------------
@dataclass
class LocalRanks:
    """Ranks 1..N-1 as processes of this machine (spawned: a fresh interpreter each, as CUDA requires)."""

    processes: list[BaseProcess] = field(default_factory=list)

    def dead(self) -> list[tuple[int, int]]:
        return [(i + 1, p.exitcode) for i, p in enumerate(self.processes) if p.exitcode not in (None, 0)]

    def reap(self, timeout_s: float = 30.0) -> None:
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join(5)


def _rank_main(job_data: Mapping[str, object], rank: int, world_size: int, address: str, port: int,
               parent: int, cwd: str) -> None:
    """Entry point of a rank process started by `start_local_ranks`."""
    from rl.config import validate_job
    from rl.loop.learner import PolicyLearner
    from rl.models import resolve_model

    job = validate_job(job_data, f"learner rank {rank}", base_dirs=[Path(cwd)])
    model_dir = resolve_model(job.model.path, job.model.cache_dir)  # prepared by the driver: a cache hit
    store = join_group(rank, world_size, address, port, rank_device(job, rank), job.cluster.collective_timeout_s)
    learner = PolicyLearner(job, model_dir)
    try:
        serve(learner, Channel(store), alive=lambda: os.getppid() == parent)
    except ConnectionError as exc:
        print(f"learner rank {rank}: {exc}; exiting", file=sys.stderr)
        sys.exit(1)
    leave_group()


def start_local_ranks(job: JobConfig, make_learner: Callable[[], PolicyLearner]) -> RankedLearner:
    """Start ranks 1..N-1 as processes, join the group as rank 0 here, build this rank's learner."""
    from rl.config import job_to_dict

    size, port, address = job.cluster.learners, free_port(), "127.0.0.1"
    ctx = multiprocessing.get_context("spawn")
    ranks = LocalRanks()
    for rank in range(1, size):
        env_rank = {"LOCAL_RANK": str(rank)}
        os.environ.update(env_rank)  # a spawned child inherits the environment at start()
        proc = ctx.Process(target=_rank_main, name=f"rlpost-learner-{rank}", daemon=False,
                           args=(job_to_dict(job), rank, size, address, port, os.getpid(), os.getcwd()))
        proc.start()
        ranks.processes.append(proc)
    os.environ["LOCAL_RANK"] = "0"
    try:
        store = join_group(0, size, address, port, rank_device(job, 0), job.cluster.collective_timeout_s)
        return RankedLearner(make_learner(), Channel(store), ranks)
    except BaseException:
        for p in ranks.processes:
            p.kill()
        ranks.reap(5)
        raise


def join_launch(job: JobConfig, make_learner: Callable[[], PolicyLearner], launch: Launch) -> RankedLearner:
    """Rank 0 of a torchrun/srun launch: join the launcher's rendezvous, build this rank's learner."""
    check_launch(job, launch)
    store = join_group(0, launch.world_size, launch.address, launch.port, rank_device(job, launch.local_rank),
                       job.cluster.collective_timeout_s, store_is_external=launch.agent_store)
    return RankedLearner(make_learner(), Channel(store), None)


def follow_launch(job: JobConfig, launch: Launch) -> int:
    """Ranks 1..N-1 of a torchrun/srun launch: serve rank 0's learner calls until it stops; the exit status."""
    from rl.loop.learner import PolicyLearner
    from rl.models import resolve_model

    check_launch(job, launch)
    model_dir = resolve_model(job.model.path, job.model.cache_dir)
    store = join_group(launch.rank, launch.world_size, launch.address, launch.port,
                       rank_device(job, launch.local_rank), job.cluster.collective_timeout_s,
                       store_is_external=launch.agent_store)
    try:
        serve(PolicyLearner(job, model_dir), Channel(store))
    except ConnectionError as exc:
        print(f"learner rank {launch.rank}: {exc}; exiting", file=sys.stderr)
        return 1
    leave_group()
    return 0
