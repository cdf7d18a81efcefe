"""A rollout worker: one engine, prompts in, `RolloutBatch` out, weights in from the learner."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from rl.batch import RolloutBatch
from rl.types import Prompt, SamplingParams


class RolloutWorker:
    """Wraps an engine built from the job; `shared_model` lets the local HF engine sample with the
    learner's own model (no copy and no weight sync: the same weights by construction)."""

    def __init__(self, job: Any, model_dir: str, shared_model: Any = None) -> None:
        from rollout.engine import build_engine

        self.job = job
        self.shared = shared_model is not None
        self.engine = build_engine(job.rollout, model_dir, dtype=job.model.dtype, device="auto", seed=job.seed,
                                   model=shared_model, max_lora_rank=_lora_rank(job))
        self.version = 0
        self._adapter_dir: Path | None = None  # the LoRA folder the engine serves now (see _serve)

    @property
    def wants_lora(self) -> bool:
        return self.job.rollout.backend == "vllm" and _lora_rank(self.job) is not None

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        if params.multi_answer is not None:  # GRPO-MA: thoughts, then answers per thought, on any engine
            from rollout.multi_answer import generate_multi_answer

            return generate_multi_answer(self.engine, prompts, params)
        return self.engine.generate(prompts, params)

    def load(self, payload: Mapping[str, Any] | None, version: int) -> float:
        """Apply a learner's sync payload; returns seconds spent."""
        start = time.perf_counter()
        self.version = version
        if payload is None:
            self.engine.policy_version = version
        elif payload["kind"] == "lora":
            folder = _write_adapter(payload["files"], version)
            try:
                self.engine.push_lora(str(folder), version)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # not served: the previous adapter stays in use
                raise
            self._serve(folder)
        else:
            self.engine.push_weights(payload["tensors"].items(), version)
            self._serve(None)  # full weights carry the policy now
        return time.perf_counter() - start

    def _serve(self, folder: Path | None) -> None:
        """Record the adapter folder the engine serves from now on and delete the one it served before.

        vLLM reads a folder when a request with its adapter id is first scheduled, and again if its LoRA cache
        evicted it, so the served folder stays. The previous one is safe to delete: the engine has dropped that
        id (VLLMEngine.push_lora/push_weights) and no generation overlaps a load (the pipeline waits for the
        one in flight before a sync; a Ray actor runs its calls one at a time)."""
        previous, self._adapter_dir = self._adapter_dir, folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the learner trains (vLLM on GPU; no-op otherwise)."""
        getattr(self.engine, "sleep", lambda: None)()

    def wake(self) -> None:
        getattr(self.engine, "wake", lambda: None)()

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            self._serve(None)  # nothing is served any more: no adapter folder outlives the worker


def _write_adapter(files: Mapping[str, bytes], version: int) -> Path:
    """A fresh temporary folder holding a pushed PEFT adapter's files (vLLM loads adapters from a path)."""
    folder = Path(tempfile.mkdtemp(prefix=f"rlpost-lora-v{version}-"))
    try:
        for name, data in files.items():
            (folder / name).write_bytes(data)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _lora_rank(job: Any) -> int | None:
    """The LoRA rank the vLLM engine must accept when the adapter is served as LoRA, else None."""
    adapter = job.adapter
    if adapter is None or job.rollout.backend != "vllm":
        return None
    # RoSA's sparse part and Bone's `bat` variant have no exact LoRA form: they are pushed merged.
    if adapter.name == "rosa" or (adapter.name == "bone" and adapter.variant == "bat"):
        return None
    return int(adapter.r)
