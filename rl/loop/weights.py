"""How a job's rollout side gets the learner's weights: one `SyncMode`, chosen here and nowhere else.

    mode = sync_mode(job)              # "shared" | "full" | "lora"
    sync = learner.weights(mode)       # SharedModel() | FullWeights(tensors) | LoraFiles(files)  (rl/types.py)
    workers.load_weights(sync, version)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rl.types import SyncMode

if TYPE_CHECKING:
    from rl.config.job import JobConfig


def sync_mode(job: JobConfig) -> SyncMode:
    """`shared`: the local transformers engine samples with the learner's own model (nothing to send);
    `lora`: a vLLM engine hot-loads the adapter's exact LoRA form (it keeps ΔW apart from W0, ADAPTERS.md §7);
    `full`: merged full weights otherwise (no adapter, an adapter without a LoRA form, or the HF engine)."""
    from trainers.adapters import lora_form_rank  # the adapter package knows which adapters have a LoRA form

    if job.sampler_is_learner:
        return "shared"
    if job.rollout.backend == "vllm" and lora_form_rank(job.adapter) is not None:
        return "lora"
    return "full"
