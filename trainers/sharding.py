"""Data parallelism over N learner ranks with FSDP2: the policy sharded, each rank training whole groups.

    group = RankGroup.current()                 # (rank, size) of the learner's torch.distributed group
    root = shard_policy(model, device)          # fully_shard per decoder layer, then a root unit over the rest
    root(lambda policy: token_logprobs(policy, ...))   # every computation on the policy runs through the root
    with lockstep.phase(backward=False): ...    # ranks run the same number of passes (padding the short ones)

Why a root wrapper: the trainer calls the policy's decoder and its LM head separately (trainers/logprobs.py
scores only loss positions, in chunks), so the causal LM's own forward, where FSDP2's root hooks would gather the
embeddings, final norm and (tied) LM head, never runs. `Root.forward(compute)` is that hook point: its unit owns
every parameter outside the decoder layers, the tied embedding included (FSDP2 needs a tied parameter inside one
unit).

Why lockstep: every pass through a sharded model is collective (each layer gathers its parameters from all
ranks), so all ranks must make the same number of passes in the same order. A rank's share of a batch may pack
into fewer micro-batches than another's (or be empty), so after each phase the ranks agree on the largest count
and the short ones make that many extra passes on a one-token dummy input that contributes nothing (zero loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from rl.batch import RolloutBatch

T = TypeVar("T")


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the learner group; size 1 (no collectives at all) without one."""

    rank: int = 0
    size: int = 1

    @staticmethod
    def current() -> RankGroup:
        if dist.is_available() and dist.is_initialized():
            return RankGroup(dist.get_rank(), dist.get_world_size())
        return RankGroup()

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def share(self, batch: RolloutBatch) -> RolloutBatch | None:
        """This rank's whole groups of `batch` (as even in group count as possible); None if it gets none."""
        if not self.sharded:
            return batch
        shards = batch.split_by_groups(self.size)
        return shards[self.rank] if self.rank < len(shards) else None

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        if not self.sharded:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.sharded:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.sharded:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return cast("list[T]", out)


class Root(torch.nn.Module):
    """FSDP2's root unit around the policy (see the module docstring). `root(compute)` = `compute(policy)`."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, compute: Callable[[torch.nn.Module], T]) -> T:
        return compute(self.policy)


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks of a (possibly PEFT-wrapped) causal LM: FSDP2's unit of sharding, as in
    torchtitan and TRL's FSDP2 plugin (one all-gather per block)."""
    from trainers.logprobs import backbone_and_head

    decoder, _ = backbone_and_head(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} has no `layers` ModuleList; cannot shard it per decoder layer")
    return list(layers)


def shard_policy(model: torch.nn.Module, device: str, group: RankGroup) -> Root:
    """Shard `model` over the learner group with FSDP2 (in place) and return its root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (group.size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    root = Root(model)
    fully_shard(root, mesh=mesh)
    return root


def unsharded_root(model: torch.nn.Module) -> Root:
    """The same call path without sharding (one rank): `root(compute)` = `compute(model)`."""
    return Root(model)


class Lockstep:
    """Counts the passes through `root` and pads every rank to the group's largest count per phase."""

    def __init__(self, root: torch.nn.Module, group: RankGroup, dummy: Callable[[bool], None]) -> None:
        self.group, self.dummy, self.passes = group, dummy, 0
        if group.sharded:
            root.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: object) -> None:
        self.passes += 1

    @contextmanager
    def phase(self, backward: bool) -> Iterator[None]:
        """Passes inside the block are this rank's; on exit, `dummy(backward)` makes up the difference to the
        largest count of any rank (a forward, and a backward of zero loss when `backward`)."""
        start = self.passes
        yield
        if not self.group.sharded:
            return
        mine = self.passes - start
        for _ in range(int(self.group.max(mine)) - mine):
            self.dummy(backward)
