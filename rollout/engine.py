"""The engine interface's shared parts: building a `RolloutBatch` from sampled sequences, per-request
seeds, prompt checks, LoRA merging for engines that cannot serve LoRA, and the backend factory.

Every backend returns completions as token ids with the sampler's logprobs; they are never
re-tokenised (token-in/token-out). Text is decoded once, here, for rewards.

Logprob contract (both backends): the log-probability of each sampled token under the distribution it
was actually drawn from, computed in fp32: log_softmax(logits / T) after top-k/top-p masking, which is
exactly log_softmax(logits / T) over the full vocabulary when top-k/top-p are off (the default).
Greedy decoding reports log_softmax(logits) (T = 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.registries import ROLLOUT_BACKENDS
from rl.types import Prompt, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.rollout import RolloutConfig


@dataclass(frozen=True)
class Sample:
    """One sampled completion of one prompt: token ids and their logprobs (same length). A multi-turn
    episode's completion also holds tool answers: `trained` is then False on those tokens (logprob 0)."""

    prompt: Prompt
    group: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    trained: tuple[bool, ...] | None = None
    """Per completion token: trained on (sampled by the model); None = all of them."""


@dataclass
class Transcript:
    """An episode's tokens after its prompt, as they grow turn by turn (rollout/episodes.py, chat_session.py):
    model turns are trained on and keep their sampling logprobs; context (tool answers, new chat messages) is
    not trained on (logprob 0). Nothing is ever re-tokenised."""

    ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def sampled(self, ids: Sequence[int], logprobs: Sequence[float]) -> None:
        self.ids += ids
        self.trained += [True] * len(ids)
        self.logprobs += logprobs

    def context(self, ids: Sequence[int]) -> None:
        self.ids += ids
        self.trained += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, prompt: Prompt, group: int, finish_reason: str) -> Sample:
        return Sample(prompt, group, tuple(self.ids), tuple(self.logprobs), finish_reason, tuple(self.trained))


def build_batch(samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, pad_token_id: int,
                policy_version: int) -> RolloutBatch:
    """Right-padded `[prompt][completion][pad]` rows (N = len(samples), T = longest row).

    loss_mask [N, T] is True on completion tokens; sampling_logprobs [N, T] holds each completion token's
    logprob at that token's own position (0 elsewhere). Example, prompt (a b), completion (c d):
    input_ids = [a b c d pad], loss_mask = [0 0 1 1 0], sampling_logprobs = [0 0 lp(c) lp(d) 0].
    """
    n = len(samples)
    width = max((len(s.prompt.token_ids) + len(s.token_ids) for s in samples), default=0)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.bool)
    loss = torch.zeros((n, width), dtype=torch.bool)
    logprobs = torch.zeros((n, width), dtype=torch.float32)
    for i, s in enumerate(samples):
        if len(s.logprobs) != len(s.token_ids) or (s.trained is not None and len(s.trained) != len(s.token_ids)):
            raise ValueError(f"sample {i}: {len(s.token_ids)} tokens but {len(s.logprobs)} logprobs")
        p, c = len(s.prompt.token_ids), len(s.token_ids)
        input_ids[i, : p + c] = torch.tensor(s.prompt.token_ids + s.token_ids, dtype=torch.long)
        attention[i, : p + c] = True
        loss[i, p : p + c] = True if s.trained is None else torch.tensor(s.trained, dtype=torch.bool)
        logprobs[i, p : p + c] = torch.tensor(s.logprobs, dtype=torch.float32)
    texts = tokenizer.batch_decode([list(s.token_ids) for s in samples], skip_special_tokens=True)
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, loss_mask=loss, sampling_logprobs=logprobs,
        prompt_lengths=torch.tensor([len(s.prompt.token_ids) for s in samples], dtype=torch.long),
        group_ids=torch.tensor([s.group for s in samples], dtype=torch.long), policy_version=policy_version,
        finish_reasons=tuple(s.finish_reason for s in samples), prompt_texts=tuple(s.prompt.text for s in samples),
        completion_texts=tuple(texts), sample_meta=tuple(s.prompt.meta for s in samples),
    ).validate()


def request_seeds(prompts: Sequence[Prompt], seed: int) -> list[int]:
    """One 63-bit seed per prompt from (call seed, prompt_id, occurrence of that id in the call).

    Deriving it from the prompt id rather than the row position makes a prompt's samples independent
    of batching and of how prompts are sharded over workers. Sample j of a group uses seed + j
    (vLLM's own rule for n > 1, followed by the HF engine too).
    """
    seen: dict[str, int] = {}
    seeds = []
    for p in prompts:
        k = seen[p.prompt_id] = seen.get(p.prompt_id, -1) + 1
        digest = hashlib.blake2b(f"{seed}|{p.prompt_id}|{k}".encode(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little") >> 2)  # room for + j without overflowing int64
    return seeds


def check_prompts(prompts: Sequence[Prompt], params: SamplingParams, max_prompt_tokens: int, context: int) -> None:
    """A prompt that cannot fit is the user's problem to fix, never silently truncated."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for p in prompts:
        if not p.token_ids:
            raise UserError(f"prompt {p.prompt_id!r} is empty; every prompt needs at least one token.")
        if len(p.token_ids) > max_prompt_tokens:
            raise UserError(f"prompt {p.prompt_id!r} has {len(p.token_ids)} tokens, above "
                            f"rollout.max_prompt_tokens={max_prompt_tokens}. Shorten the prompt or raise that limit.")
        if len(p.token_ids) + params.max_new_tokens > context:
            raise UserError(f"prompt {p.prompt_id!r} has {len(p.token_ids)} tokens; with max_new_tokens="
                            f"{params.max_new_tokens} it exceeds the engine's context of {context} tokens. Shorten "
                            "the prompt, lower rollout.max_new_tokens, or raise rollout.vllm.max_model_len.")


def lora_rank(adapter_dir: str) -> int:
    """The rank `r` in a PEFT adapter directory's adapter_config.json."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT LoRA adapter directory (no adapter_config.json).")
    return int(json.loads(path.read_text())["r"])


def merge_lora(base: Mapping[str, torch.Tensor], adapter_dir: str) -> dict[str, torch.Tensor]:
    """The weights a PEFT LoRA adapter changes, merged: W = W0 + scale * B @ A (out of place).

    base: the model's state dict (unchanged). Returns only the merged weights, keyed like `base`.
    Plain safetensors reading, no PEFT: an adapter feature this cannot merge exactly is an error.
    """
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)]
    if unsupported:
        raise UserError(f"LoRA adapter {adapter_dir} uses {unsupported}, which the rollout engine cannot merge; "
                        "use plain LoRA (or serve it with backend: vllm).")
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    merged = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]  # [out, r] @ [r, in]
        target = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
        if target not in base:
            raise UserError(f"LoRA adapter {adapter_dir} targets {target}, which this model does not have.")
        w0 = base[target]
        merged[target] = (w0.float() + scale * (b.float() @ a.float())).to(w0.dtype)
    return merged


def build_engine(rollout_cfg: RolloutConfig, model_dir: str, dtype: str, device: str, seed: int,
                 model: torch.nn.Module | None = None, max_lora_rank: int | None = None) -> RolloutEngine:
    """The `rollout.backend` engine (a `rl.types.RolloutEngine`).

    model: HF backend only, an already-loaded model to sample with (shared with the learner, no copy).
    max_lora_rank: vLLM backend only, start the engine with LoRA serving up to this rank.
    """
    factory = ROLLOUT_BACKENDS.get(rollout_cfg.backend)
    return factory(rollout_cfg, model_dir=model_dir, dtype=dtype, device=device, seed=seed, model=model,
                   max_lora_rank=max_lora_rank)
