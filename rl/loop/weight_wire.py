"""What a collective weight sync carries (rl/loop/weight_channel.py sends it): the fixed-field header, size-bounded
single-dtype buckets, and the probes that verify the engine's weights afterwards.

A probe of a matrix W [rows, ...] is `W @ v`, v a random +-1 vector per input width seeded by the policy version
(the same on every side); of a vector, the vector itself. It is one pass over the weights like a checksum, but it
can also be computed from what an engine holds where the weights are not readable as sent: vLLM's CPU backend keeps
linear layers only as packed oneDNN handles (the probe runs through the layer's own kernel) and fuses q/k/v and
gate/up (the fused output splits back by rows). A stale, skipped, swapped or misnamed tensor moves its probe by
O(|probe|); float kernels summing in another order by ~1e-6 of it (RTOL).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch


# ----- what travels ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """torch dtype name without `torch.`, e.g. float32."""
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype), self.dtype
        return dtype

    @property
    def numel(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class Bucket:
    """Tensors [start, end) of the header, one dtype, sent as one flat buffer."""

    start: int
    end: int


@dataclass(frozen=True)
class SyncHeader:
    """Everything a receiver needs before the first bucket; fixed fields, pickled."""

    version: int
    kind: Literal["full", "lora"]
    tensors: tuple[TensorSpec, ...]
    """Distinct tensors in send order (checkpoint order: vLLM stacks q/k/v, gate/up from adjacent tensors)."""
    buckets: tuple[Bucket, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    """name -> the tensor it shares storage with (tied embeddings): sent once."""
    verify: bool = True

    def bucket_bytes(self, bucket: Bucket) -> int:
        return sum(s.nbytes for s in self.tensors[bucket.start:bucket.end])

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.tensors)


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> tuple[Bucket, ...]:
    """Consecutive runs of one dtype of at most `bucket_bytes` (a larger tensor is a bucket of its own); the send
    order stays as given."""
    buckets, start, size = [], 0, 0
    for i, spec in enumerate(specs):
        if i > start and (spec.dtype != specs[start].dtype or size + spec.nbytes > bucket_bytes):
            buckets.append(Bucket(start, i))
            start, size = i, 0
        size += spec.nbytes
    if specs:
        buckets.append(Bucket(start, len(specs)))
    return tuple(buckets)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 buffer holding `tensors` (one dtype) back to back."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)
    return flat.contiguous().view(torch.uint8)


def unflatten(buffer: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """Views of `buffer` (uint8) as the tensors `specs`, back to back."""
    out, offset = [], 0
    for spec in specs:
        out.append(buffer[offset:offset + spec.nbytes].view(spec.torch_dtype).view(spec.shape))
        offset += spec.nbytes
    return out


def distinct_tensors(named: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The tensors to send (aliases of one storage once) and the aliases (name -> sent name)."""
    first: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}  # storage, offset, shape, dtype -> name
    distinct, aliases = [], {}
    for name, t in named.items():
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            distinct.append((name, t))
    return distinct, aliases


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape))


# ----- probes (verification) ------------------------------------------------------------------------
def probe_vectors(specs: Sequence[TensorSpec], seed: int) -> dict[int, torch.Tensor]:
    """A random +-1 float32 vector per input width of the matrices in `specs` (the same on every side)."""
    dims = sorted({_width(s.shape) for s in specs if len(s.shape) >= 2})
    gen = torch.Generator().manual_seed(seed)
    return {d: torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1 for d in dims}


def _width(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape[1:]:
        count *= d
    return count


def probe(t: torch.Tensor, vectors: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """`W @ v` (float32 [rows]) for a matrix, the tensor itself (float32) for a vector."""
    if t.dim() < 2:
        return t.detach().float().reshape(-1)
    return t.detach().reshape(t.shape[0], -1).float() @ vectors[_width(tuple(t.shape))]


RTOL = {"float32": 1e-4, "float64": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
"""Allowed |engine - sent| probe difference relative to the probe's largest entry: float kernels sum in another
order (measured ~1e-6 in fp32 for SmolLM2's widths); a wrong tensor differs by O(1)."""


def mismatches(specs: Sequence[TensorSpec], sent: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor]
               ) -> list[str]:
    """One line per tensor whose engine probe is missing or off, with the relative difference."""
    lines = []
    for spec in specs:
        expected, got = sent[spec.name], held.get(spec.name)
        if got is None or got.shape != expected.shape:
            lines.append(f"{spec.name}: not held by the engine as sent")
            continue
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        diff = float((got - expected).abs().max()) if expected.numel() else 0.0
        if not diff <= RTOL.get(spec.dtype, 1e-4) * scale + 1e-12:
            lines.append(f"{spec.name}: max |engine - sent| probe {diff:.3g} (largest probe entry {scale:.3g})")
    return lines


def digest(data: bytes | torch.Tensor) -> str:
    raw = data if isinstance(data, bytes) else data.numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()
