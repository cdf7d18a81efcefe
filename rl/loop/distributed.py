"""The learner's process group: N ranks (`cluster.learners`), one torch.distributed group, one sharded policy.

Every rank runs the same learner methods in the same order (their collectives pair up); how the calls reach
the ranks depends on the placement: `local` (rank 0 is the driver and forwards each call to ranks started here
or by torchrun/srun) or `ray` (the driver calls every rank's actor). This module holds what every placement
shares: joining the group with a timeout on every collective, and the addresses to rendezvous at.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def backend_for(device: str) -> str:
    """NCCL between GPUs, gloo between CPU processes (torch's two production backends)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def join_group(rank: int, world_size: int, address: str, port: int, device: str, timeout_s: float) -> None:
    """Join the learner group at tcp://address:port as `rank` of `world_size`. `timeout_s` bounds every
    collective of the group, so a rank that died or hangs surfaces as an error on the others, never a hang."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend_for(device), init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


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
