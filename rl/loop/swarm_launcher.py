"""`rl swarm JOB --nodes N`: run N SAPO nodes of one job; the job's `swarm.transport` decides how.

* memory: lock-step in this process. Every round all nodes generate and publish, then all train, so
  each node sees its peers' rollouts of the same round: a deterministic, controlled experiment.
* http:   one `rl train` process per node and a hub in this process (nodes run at their own pace), guarded by
          the token in `swarm.transport.token_env` (one is made for the nodes when it is unset).
* ray:    one Ray actor per node on a local (or `swarm.transport.address`) cluster, sharing a named
          exchange actor.

Node i gets `swarm.node_id=node<i>`, `seed=<seed>+i` (its own questions and samples) and
`run_dir=<run_dir>/node<i>`. A node that fails does not stop the others; the exit status is the worst.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rl.errors import UserError

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.config.swarm import HttpTransport, MemoryTransport, RayTransport, SwarmConfig

TransportT = TypeVar("TransportT", "MemoryTransport", "HttpTransport", "RayTransport")


def node_overrides(job: JobConfig, overrides: Sequence[str], i: int) -> list[str]:
    return [*overrides, f"swarm.node_id=node{i}", f"seed={job.seed + i}",
            f"run_dir={Path(job.resolved_run_dir) / f'node{i}'}"]


def launch(job_ref: str, overrides: Sequence[str], nodes: int) -> int:
    from rl.config import load_job

    job = load_job(job_ref, overrides)
    if job.swarm is None:
        raise UserError("rl swarm needs a job with a `swarm:` section (e.g. swarm: {local: 4, external: 4}); "
                        "see rl/jobs/sapo.yaml.")
    if job.cluster.name != "local":
        raise UserError("rl swarm runs each node with cluster: local (a node is one process or actor); "
                        "set cluster.name=local.")
    if nodes < 1:
        raise UserError("--nodes must be at least 1.")
    runner = {"memory": _run_lockstep, "http": _run_processes, "ray": _run_ray}[job.swarm.transport.name]
    return runner(job_ref, job, list(overrides), nodes)


def _swarm(job: JobConfig) -> SwarmConfig:
    """The job's swarm section (`launch` checked there is one)."""
    assert job.swarm is not None, "launch rejects a job without a swarm section"
    return job.swarm


def _transport(job: JobConfig, kind: type[TransportT]) -> TransportT:
    """The job's swarm transport as the variant its runner was picked for (`launch` dispatches on its name)."""
    transport = _swarm(job).transport
    if not isinstance(transport, kind):
        raise TypeError(f"swarm transport {transport.name!r} is not a {kind.__name__}")
    return transport


def _run_lockstep(job_ref: str, job: JobConfig, overrides: list[str], nodes: int) -> int:
    from rl.config import load_job
    from rl.loop.lockstep import run_lockstep

    quiet = ["logging.progress=false", "logging.wandb.mode=disabled"]  # one process, N loggers
    jobs = [load_job(job_ref, node_overrides(job, overrides, i) + quiet) for i in range(nodes)]
    dirs = run_lockstep(jobs)
    print("\n".join(f"node{i}: {d}" for i, d in enumerate(dirs)))
    return 0


def _run_processes(job_ref: str, job: JobConfig, overrides: list[str], nodes: int) -> int:
    import os
    import secrets
    from urllib.parse import urlparse

    from rl.config.swarm import HttpTransport
    from rl.swarm.hub import Hub

    transport = _transport(job, HttpTransport)
    url = urlparse(transport.url)
    # The nodes are this process's children: without a token in the environment, one made here guards the hub
    # (and reaches the nodes through their environment, never their job files or command lines).
    env = {**os.environ, transport.token_env: os.environ.get(transport.token_env) or secrets.token_urlsafe(32)}
    hub = Hub(url.hostname or "127.0.0.1", 8765 if url.port is None else url.port,
              max_message_bytes=_swarm(job).max_message_bytes, token=env[transport.token_env])
    print(f"swarm hub at {hub.url}: {hub.exposure()}")
    procs = []
    try:
        for i in range(nodes):
            args = [*node_overrides(job, overrides, i), f"swarm.transport.url={hub.url}", "logging.progress=false"]
            log_path = Path(job.resolved_run_dir) / f"node{i}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "rl.cli", "train", job_ref, *args],
                                              stdout=log, stderr=subprocess.STDOUT, env=env))
            print(f"node{i}: pid {procs[-1].pid}, log {log_path}")
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        hub.close()
    print("exit codes: " + ", ".join(f"node{i}={c}" for i, c in enumerate(codes)))
    return max(codes)


class NodeHost:
    """A Ray actor running one node's whole `rl train`."""

    def run(self, job_ref: str, overrides: list[str], threads: int) -> int:
        import torch

        from rl.config import load_job
        from rl.loop.driver import train_job

        torch.set_num_threads(threads)
        return train_job(load_job(job_ref, overrides))


def _run_ray(job_ref: str, job: JobConfig, overrides: list[str], nodes: int) -> int:
    import os

    from rl.config.swarm import RayTransport
    from rl.swarm.ray_transport import ensure_ray, exchange_actor, kill_exchange

    transport = _transport(job, RayTransport)
    ray = ensure_ray(transport.address)
    exchange_actor(ray, transport.exchange)
    threads = max(1, (os.cpu_count() or 1) // nodes)
    host = ray.remote(num_cpus=0, max_restarts=0)(NodeHost)
    actors = [host.remote() for _ in range(nodes)]
    quiet = ["logging.progress=false"]
    refs = {a.run.remote(job_ref, node_overrides(job, overrides, i) + quiet, threads): i for i, a in enumerate(actors)}
    codes: dict[int, int] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = refs[done[0]]
        try:
            codes[i] = int(ray.get(done[0]))
        except Exception as exc:  # noqa: BLE001 - one node's failure is reported, the others go on
            print(f"node{i} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            codes[i] = 1
        print(f"node{i} finished ({time.strftime('%H:%M:%S')})")
    kill_exchange(transport.exchange)
    return max(codes.values())
