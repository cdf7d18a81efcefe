"""Collective weight sync: learner rank 0 -> K rollout workers over a torch.distributed group of their own.

The learner ranks already use their process's default group (rl/loop/distributed.py), so this group is built
apart from it, from its own rendezvous: a TCPStore that rank 0 (the sender) opens on a port the OS picks, behind
a PrefixStore, and a gloo (CPU) or NCCL (CUDA) process group object on it, as vLLM's StatelessProcessGroup and
the weight-update groups of OpenRLHF/verl do. Every operation has the group's timeout.

One sync, on the sender and on every receiver at once (the driver issues both sides' calls together):

    header    SyncHeader (names, dtypes, shapes, bucket boundaries, version), pickled as a uint8 tensor
    buckets   per bucket: its tensors (one dtype, at most bucket_mib) flattened into one buffer, broadcast;
              the receiver's engine loads each tensor as soon as its bucket has arrived (vLLM: the collective
              writes straight into the engine's shared-memory buffer, rollout/_vllm_internals.py)
    trailer   with verify: the sender's probe of every tensor it sent

Verification (rl/loop/weight_wire.py): the sender's probe of each tensor (`W @ v`, one pass over the weights) against
the same probe computed from what the ENGINE holds after loading (vLLM: in its worker, through the packed CPU kernels
and fused layers). LoRA files are checked by digest against the files the engine loads its adapter from. A mismatch
raises `WeightSyncMismatch` naming the tensors.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from rl.errors import UserError
from rl.loop.cluster import LearnerHost, RolloutHost
from rl.loop.distributed import node_address
from rl.loop.weight_wire import (
    SyncHeader,
    digest,
    distinct_tensors,
    flatten,
    mismatches,
    plan_buckets,
    probe,
    probe_vectors,
    spec_of,
    unflatten,
)
from rl.types import FullWeights, LoraFiles, SyncMode, WeightSync

if TYPE_CHECKING:
    from types import ModuleType

    from ray.actor import ActorHandle

    from rl.loop.worker import EngineWorker

MIB = 1 << 20
# A process-group object outside the default group (ProcessGroupGloo / ProcessGroupNCCL): torch's stubs do not declare
# their collectives, and a CPU build has no ProcessGroupNCCL to name.
_Backend = Any
_PREFIX = "rlpost-weight-sync"


class WeightSyncMismatch(UserError):
    """The engine's weights after a sync differ from what the learner sent."""


class WeightSyncTimeout(UserError):
    """A member of the weight-sync group did not join or take part in a sync within the group's timeout."""


@runtime_checkable
class StreamingEngine(Protocol):
    """An engine that loads tensors while they arrive and reads its weights back as probes (VLLMEngine)."""

    def push_weights_streamed(self, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                              aliases: Mapping[str, str], fill: Callable[[torch.Tensor], Iterator[int]],
                              version: int) -> float: ...

    def weight_probes(self, shapes: Mapping[str, tuple[int, ...]], vectors: Mapping[int, torch.Tensor]
                      ) -> dict[str, torch.Tensor]: ...


def held_probes(engine: object, shapes: Mapping[str, tuple[int, ...]], vectors: Mapping[int, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The engine's weights after loading, as probes: vLLM computes them in its worker process; an engine holding a
    torch model (transformers) from that model's state dict."""
    if isinstance(engine, StreamingEngine):
        return engine.weight_probes(shapes, vectors)
    model = getattr(engine, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"cannot read weights back from a {type(engine).__name__} engine to verify a sync")
    state = model.state_dict()
    return {name: probe(state[name], vectors) for name in shapes if name in state}


# ----- the group ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupAddress:
    """Where the sync group meets: rank 0 (the learner) listens at host:port; ranks 1..world_size-1 are the
    rollout workers."""

    host: str
    port: int
    world_size: int
    device: str
    timeout_s: float


class WeightGroup:
    """This process's member of one weight-sync group (not the default group: a process may be in both)."""

    def __init__(self, address: GroupAddress, rank: int, store: dist.TCPStore | None = None) -> None:
        self.address, self.rank = address, rank
        self.timeout = timedelta(seconds=address.timeout_s)
        self.device = torch.device(address.device)
        if store is None:
            store = dist.TCPStore(address.host, address.port, address.world_size, is_master=False,
                                  timeout=self.timeout)
        self._store: dist.TCPStore | None = store  # the process group holds no reference to it: keep it alive
        prefixed = dist.PrefixStore(_PREFIX, store)
        with self._bounded("join the group"):
            backend = _BACKENDS[address.device.split(":")[0]]
            self.pg: _Backend | None = backend(prefixed, rank, address.world_size, self.timeout)

    @classmethod
    def open(cls, world_size: int, device: str, timeout_s: float) -> tuple[dist.TCPStore, GroupAddress]:
        """Rank 0's store on a port the OS picks (no race with another listener) and the address to give out."""
        host = node_address()
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return store, GroupAddress(host, int(store.port), world_size, device, timeout_s)

    def broadcast(self, buffer: torch.Tensor) -> None:
        """Rank 0's `buffer` into every rank's `buffer` (uint8, same size), within the timeout."""
        staged = buffer if buffer.device == self.device else buffer.to(self.device)
        assert self.pg is not None, "the weight-sync group is closed"
        with self._bounded("broadcast weights"):
            self.pg.broadcast(staged, 0).wait(self.timeout)
        if staged is not buffer:
            buffer.copy_(staged)

    @contextlib.contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        """torch's store/collective timeout (a peer died or hangs) as a message that says what to do."""
        try:
            yield
        except RuntimeError as exc:  # torch's DistError (timeouts) and gloo's closed-connection errors
            raise WeightSyncTimeout(
                f"weight sync: rank {self.rank} could not {what} with the other {self.address.world_size - 1} "
                f"member(s) of the weight-sync group at {self.address.host}:{self.address.port} within "
                f"{self.address.timeout_s:.0f}s (cluster.collective_timeout_s): a rollout worker or the learner died "
                f"or hangs ({type(exc).__name__}: {str(exc)[:200]}). Resume with `rl train --resume RUN_DIR`.") \
                from None

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's picklable `obj` on every rank (length first, then the bytes)."""
        data = pickle.dumps(obj) if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast(size.view(torch.uint8))
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else \
            torch.empty(int(size[0]), dtype=torch.uint8)
        self.broadcast(raw)
        return obj if self.rank == 0 else pickle.loads(raw.numpy().tobytes())  # our own group's bytes

    def close(self) -> None:
        self.pg = None
        self._store = None


def _gloo(store: dist.Store, rank: int, size: int, timeout: timedelta) -> _Backend:
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _nccl(store: dist.Store, rank: int, size: int, timeout: timedelta) -> _Backend:
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, options)


_BACKENDS = {"cpu": _gloo, "cuda": _nccl}


# ----- the two sides of one sync ------------------------------------------------------------------
@dataclass(frozen=True)
class SyncReport:
    """One side's figures for one sync."""

    version: int
    seconds: float
    bytes: int
    buckets: int
    verify_s: float = 0.0
    """Seconds spent on verification on this side (sender: probes; receiver: read-back and compare)."""
    path: str = ""
    """Receiver: how the engine loaded (vLLM `direct`/`vllm`, `copy` otherwise)."""


def send_weights(group: WeightGroup, sync: WeightSync, version: int, bucket_bytes: int, verify: bool) -> SyncReport:
    """Broadcast `sync` (FullWeights or LoraFiles) to the group's receivers as policy `version`."""
    start = time.perf_counter()
    named, kind = _named(sync)
    distinct, aliases = distinct_tensors(named)
    specs = tuple(spec_of(n, t) for n, t in distinct)
    header = SyncHeader(version, kind, specs, plan_buckets(specs, bucket_bytes), aliases, verify)
    # The probes are computed from the tensors being sent, in a thread while the buckets go out (torch releases
    # the GIL in both), and travel after them: the receivers are still loading the last bucket meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlpost-probe") as pool:
        checks = pool.submit(_sender_checks, header, distinct) if verify else None
        group.broadcast_object(header)
        for b in header.buckets:
            group.broadcast(flatten([t for _, t in distinct[b.start:b.end]]))
        verify_s = 0.0
        if checks is not None:
            t0 = time.perf_counter()  # what verification adds here: waiting for the probes, sending them
            _send_checks(group, header, checks.result())
            verify_s = time.perf_counter() - t0
    return SyncReport(version, time.perf_counter() - start, header.nbytes, len(header.buckets), verify_s)


def _named(sync: WeightSync) -> tuple[dict[str, torch.Tensor], Literal["full", "lora"]]:
    match sync:
        case FullWeights(tensors=tensors):
            return dict(tensors), "full"
        case LoraFiles(files=files):
            return {n: torch.frombuffer(bytearray(data), dtype=torch.uint8) for n, data in files.items()}, "lora"
        case _:
            raise TypeError(f"nothing to send for {type(sync).__name__}: a collective sync carries full weights "
                            "or LoRA files")


Checks = Mapping[str, Any]
"""The sender's checks by tensor name: a float32 probe tensor (full weights) or a digest string (LoRA files)."""


def _sender_checks(header: SyncHeader, distinct: Sequence[tuple[str, torch.Tensor]]) -> Checks:
    if header.kind == "lora":
        return {n: digest(t) for n, t in distinct}
    vectors = probe_vectors(header.tensors, header.version)
    return {n: probe(t, vectors) for n, t in distinct}


def _probe_sizes(header: SyncHeader) -> list[int]:
    """Entries of each tensor's probe: its rows for a matrix, its elements for a vector."""
    return [s.shape[0] if len(s.shape) >= 2 else s.numel for s in header.tensors]


def _send_checks(group: WeightGroup, header: SyncHeader, checks: Checks) -> None:
    """Full weights: every probe in one flat float32 buffer whose size the receivers know from the header (no
    pickling of ~300 small tensors); LoRA digests: pickled."""
    if header.kind == "lora":
        group.broadcast_object(checks)
    else:
        group.broadcast(torch.cat([checks[s.name] for s in header.tensors]).view(torch.uint8))


def _receive_checks(group: WeightGroup, header: SyncHeader) -> Checks:
    if header.kind == "lora":
        checks: Checks = group.broadcast_object()
        return checks
    sizes = _probe_sizes(header)
    flat = torch.empty(sum(sizes) * 4, dtype=torch.uint8)
    group.broadcast(flat)
    return dict(zip((s.name for s in header.tensors), flat.view(torch.float32).split(sizes)))


def receive_weights(group: WeightGroup, worker: EngineWorker) -> SyncReport:
    """Receive one sync from rank 0 into `worker`'s engine; with the sender's verify, check what the engine holds."""
    start = time.perf_counter()
    header: SyncHeader = group.broadcast_object()
    if header.kind == "lora":
        _receive_lora(group, worker, header)
    else:
        _receive_full(group, worker, header)
    verify_s = 0.0
    if header.verify:
        sent = _receive_checks(group, header)
        t0 = time.perf_counter()
        _verify(worker, header, sent)
        verify_s = time.perf_counter() - t0
    worker.version = header.version
    return SyncReport(header.version, time.perf_counter() - start, header.nbytes, len(header.buckets), verify_s,
                      getattr(worker.engine, "sync_path", "") or "copy")


def _receive_full(group: WeightGroup, worker: EngineWorker, header: SyncHeader) -> None:
    engine = worker.engine
    if isinstance(engine, StreamingEngine):
        specs = [(s.name, s.torch_dtype, s.shape) for s in header.tensors]
        engine.push_weights_streamed(specs, header.aliases, lambda region: _fill(group, header, region),
                                     header.version)
    else:  # an engine that copies tensors in place as they come (transformers)
        engine.push_weights(_arriving(group, header), header.version)


def _fill(group: WeightGroup, header: SyncHeader, region: torch.Tensor) -> Iterator[int]:
    """Receive each bucket straight into its place in `region` (tensors back to back); yield tensors complete."""
    offset = 0
    for b in header.buckets:
        size = header.bucket_bytes(b)
        group.broadcast(region[offset:offset + size])
        offset += size
        yield b.end


def _arriving(group: WeightGroup, header: SyncHeader) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) as each bucket arrives, aliases after their source."""
    sources: dict[str, torch.Tensor] = {}
    wanted = set(header.aliases.values())
    for b in header.buckets:
        buffer = torch.empty(header.bucket_bytes(b), dtype=torch.uint8)
        group.broadcast(buffer)
        specs = header.tensors[b.start:b.end]
        for spec, tensor in zip(specs, unflatten(buffer, specs)):
            if spec.name in wanted:
                sources[spec.name] = tensor
            yield spec.name, tensor
    for alias, source in header.aliases.items():
        yield alias, sources[source]


def _receive_lora(group: WeightGroup, worker: EngineWorker, header: SyncHeader) -> None:
    files: dict[str, bytes] = {}
    for b in header.buckets:
        buffer = torch.empty(header.bucket_bytes(b), dtype=torch.uint8)
        group.broadcast(buffer)
        specs = header.tensors[b.start:b.end]
        files.update((s.name, t.numpy().tobytes()) for s, t in zip(specs, unflatten(buffer, specs)))
    worker.load_weights(LoraFiles(files), header.version)


def _verify(worker: EngineWorker, header: SyncHeader, sent: Checks) -> None:
    if header.kind == "lora":
        problems = _lora_mismatches(worker, header, sent)
    else:
        vectors = probe_vectors(header.tensors, header.version)
        held = held_probes(worker.engine, {s.name: s.shape for s in header.tensors}, vectors)
        problems = mismatches(header.tensors, sent, held)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WeightSyncMismatch(
            f"weight sync to policy version {header.version} is wrong: the rollout engine does not hold what the "
            f"learner sent for {len(problems)} tensor(s): {shown}. The engine would sample from other weights "
            "than the learner trains; stop here. Resume from the last checkpoint with `rl train --resume "
            "RUN_DIR`; if it repeats, set cluster.weight_sync.transport: object_store and report the tensor named.")


def _lora_mismatches(worker: EngineWorker, header: SyncHeader, sent: Checks) -> list[str]:
    """The adapter files the engine loads from (vLLM reads them from its LoRA request's folder) against the
    sender's digests."""
    request = getattr(worker.engine, "lora_request", None)
    folder = Path(request.lora_path) if request is not None else None
    lines = []
    for spec in header.tensors:
        path = folder / spec.name if folder is not None else None
        if path is None or not path.is_file():
            lines.append(f"{spec.name}: not in the engine's adapter folder")
        elif digest(path.read_bytes()) != sent[spec.name]:
            lines.append(f"{spec.name}: the engine's adapter file differs from the one sent")
    return lines


# ----- Ray hosts (subclasses of rl/loop/cluster.py's) and the driver's calls ----------------------
class SyncLearnerHost(LearnerHost):
    """LearnerHost that is rank 0 (the sender) of the weight-sync group."""

    _store: dist.TCPStore | None = None
    _group: WeightGroup | None = None

    def open_weight_group(self, world_size: int, device: str, timeout_s: float) -> GroupAddress:
        self._store, address = WeightGroup.open(world_size, device, timeout_s)
        return address

    def join_weight_group(self, address: GroupAddress) -> None:
        self._group = WeightGroup(address, 0, self._store)

    def send_weights(self, mode: SyncMode, version: int, bucket_mib: int, verify: bool) -> SyncReport | None:
        """`weights(mode)`, broadcast by the member of the sync group. With N learner ranks call it on every rank's
        host (`weights` is collective over the learner ranks); only rank 0's host joined the group and sends, the
        others return None."""
        sync = self.learner.weights(mode)
        if self._group is None:
            return None
        return send_weights(self._group, sync, version, bucket_mib * MIB, verify)


class SyncRolloutHost(RolloutHost):
    """RolloutHost that receives weights as rank 1..K of the weight-sync group."""

    _group: WeightGroup | None = None

    def join_weight_group(self, address: GroupAddress, rank: int) -> None:
        self._group = WeightGroup(address, rank)

    def receive_weights(self) -> SyncReport:
        assert self._group is not None, "join_weight_group first"
        worker = self.worker
        assert hasattr(worker, "engine"), "a collective sync needs an EngineWorker"
        return receive_weights(self._group, worker)  # type: ignore[arg-type]  # checked just above


def connect(ray: ModuleType, learner: ActorHandle, workers: Sequence[ActorHandle], device: str,
            timeout_s: float) -> GroupAddress:
    """Form the group: the learner opens it, then all members join at once (joining blocks until all have)."""
    address: GroupAddress = ray.get(learner.open_weight_group.remote(len(workers) + 1, device, timeout_s),
                                    timeout=timeout_s)
    refs = [learner.join_weight_group.remote(address)]
    refs += [w.join_weight_group.remote(address, i + 1) for i, w in enumerate(workers)]
    _get(ray, refs, timeout_s)
    return address


def sync(ray: ModuleType, learner: ActorHandle, workers: Sequence[ActorHandle], mode: SyncMode, version: int,
         bucket_mib: int, verify: bool, timeout_s: float) -> tuple[SyncReport, list[SyncReport]]:
    """One collective sync: the sender's and every receiver's call issued together; (sender's, receivers')."""
    refs = [learner.send_weights.remote(mode, version, bucket_mib, verify)]
    refs += [w.receive_weights.remote() for w in workers]
    sent, *received = _get(ray, refs, timeout_s)
    return sent, received


def _get(ray: ModuleType, refs: list[Any], timeout_s: float) -> list[Any]:
    """Results of `refs`; a UserError raised in an actor (a mismatch) is raised here as itself."""
    try:
        return list(ray.get(refs, timeout=timeout_s))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, UserError):
            raise cause from None
        raise
