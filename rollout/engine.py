"""The engine interface's shared parts: building a `RolloutBatch` from sampled sequences, and the factory.

Every backend returns completions as token ids with the sampler's logprobs; they are never
re-tokenised (token-in/token-out). Text is decoded once, here, for rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.registries import ROLLOUT_BACKENDS
from rl.types import Prompt, SamplingParams


@dataclass(frozen=True)
class Sample:
    """One sampled completion of one prompt."""

    prompt: Prompt
    group: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


def build_batch(samples: Sequence[Sample], tokenizer: Any, pad_token_id: int, policy_version: int) -> RolloutBatch:
    """Right-padded `[prompt][completion]` rows, loss mask on completion tokens, logprobs aligned with tokens."""
    n = len(samples)
    lengths = [len(s.prompt.token_ids) + len(s.token_ids) for s in samples]
    width = max(lengths) if lengths else 0
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.bool)
    loss = torch.zeros((n, width), dtype=torch.bool)
    logprobs = torch.zeros((n, width), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, c = len(s.prompt.token_ids), len(s.token_ids)
        input_ids[i, : p + c] = torch.tensor(s.prompt.token_ids + s.token_ids, dtype=torch.long)
        attention[i, : p + c] = True
        loss[i, p : p + c] = True
        logprobs[i, p : p + c] = torch.tensor(s.logprobs, dtype=torch.float32)
    texts = tokenizer.batch_decode([list(s.token_ids) for s in samples], skip_special_tokens=True)
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, loss_mask=loss, sampling_logprobs=logprobs,
        prompt_lengths=torch.tensor([len(s.prompt.token_ids) for s in samples], dtype=torch.long),
        group_ids=torch.tensor([s.group for s in samples], dtype=torch.long), policy_version=policy_version,
        finish_reasons=[s.finish_reason for s in samples], prompt_texts=[s.prompt.text for s in samples],
        completion_texts=texts, sample_meta=[s.prompt.meta for s in samples],
    ).validate()


def check_prompts(prompts: Sequence[Prompt], params: SamplingParams, max_prompt_tokens: int, context: int) -> None:
    """A prompt that cannot fit is the user's problem to fix, never silently truncated."""
    for p in prompts:
        if len(p.token_ids) > max_prompt_tokens or len(p.token_ids) + params.max_new_tokens > context:
            raise UserError(
                f"prompt {p.prompt_id!r} has {len(p.token_ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                f"it exceeds rollout.max_prompt_tokens={max_prompt_tokens} or the model context ({context}). "
                "Shorten the prompt or raise those limits.")
        if not p.token_ids:
            raise UserError(f"prompt {p.prompt_id!r} is empty.")


def build_engine(cfg: Any, model_dir: str, dtype: str, device: str, seed: int, model: Any = None,
                 max_lora_rank: int | None = None) -> Any:
    """The `rollout.backend` engine. `model` (HF only) reuses an already-loaded model instead of a copy."""
    factory = ROLLOUT_BACKENDS.get(cfg.backend)
    return factory(cfg, model_dir=model_dir, dtype=dtype, device=device, seed=seed, model=model,
                   max_lora_rank=max_lora_rank)
