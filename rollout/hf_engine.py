"""`backend: hf`: transformers generation with KV cache and batching (the portable CPU default)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch

from rl.batch import RolloutBatch
from rl.models import load_causal_lm, load_tokenizer
from rl.registries import ROLLOUT_BACKENDS
from rl.types import Prompt, SamplingParams
from rollout.engine import Sample, build_batch, check_prompts


class HFEngine:
    """Samples with a transformers model. Given the learner's own model (local sync mode) it needs no
    weight sync at all; otherwise it holds a copy updated in place by `push_weights`."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 64, max_prompt_tokens: int = 512) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_prompt_tokens = max_batch_size, max_prompt_tokens
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context = int(getattr(model.config, "max_position_embeddings", 4096))
        self.policy_version = 0

    @classmethod
    def from_config(cls, cfg: Any, model_dir: str, dtype: str, device: str, seed: int, model: Any = None,
                    max_lora_rank: int | None = None) -> "HFEngine":
        if model is None:
            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            model = load_causal_lm(model_dir, dtype, device).eval().requires_grad_(False)
        return cls(model, load_tokenizer(model_dir), cfg.hf.max_batch_size, cfg.max_prompt_tokens)

    # ----- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        check_prompts(prompts, params, self.max_prompt_tokens, self.context)
        rows = [(g, p) for g, p in enumerate(prompts) for _ in range(params.group_size)]
        samples: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), self.max_batch_size):
                samples.extend(self._round(rows[start:start + self.max_batch_size], params, start))
        finally:
            self.model.train(was_training)
        return build_batch(samples, self.tokenizer, self.pad_id, self.policy_version)

    def _round(self, rows: list[tuple[int, Prompt]], params: SamplingParams, offset: int) -> list[Sample]:
        ids, attention = _left_pad([p.token_ids for _, p in rows], self.pad_id)
        device = next(self.model.parameters()).device
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed * 7907 + offset)  # reproducible per call and round
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy, temperature=params.temperature if not params.greedy else None,
                top_p=params.top_p if not params.greedy else None,
                top_k=(params.top_k if params.top_k > 0 else None) if not params.greedy else None,
                eos_token_id=self.eos_ids, pad_token_id=self.pad_id, return_dict_in_generate=True,
                output_logits=True, use_cache=True, stop_strings=list(params.stop) or None,
                tokenizer=self.tokenizer if params.stop else None)
        new = out.sequences[:, ids.shape[1]:].cpu()  # [R, L]
        logps = _sampled_logprobs(out.logits, new, 1.0 if params.greedy else params.temperature)
        return [self._sample(g, p, new[i], logps[i], params) for i, (g, p) in enumerate(rows)]

    def _sample(self, group: int, prompt: Prompt, tokens: torch.Tensor, logps: torch.Tensor,
                params: SamplingParams) -> Sample:
        keep, reason = _cut(tokens.tolist(), self.eos_ids, self.pad_id, params, self.tokenizer)
        return Sample(prompt, group, tuple(tokens[:keep].tolist()), tuple(logps[:keep].tolist()), reason)

    # ----- weights ---------------------------------------------------------------------------
    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> float:
        start = time.perf_counter()
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                state[name].copy_(tensor)  # KeyError names a weight this model does not have
        self.policy_version = version
        return time.perf_counter() - start

    def push_lora(self, adapter_dir: str, version: int) -> float:
        """Merge a PEFT LoRA directory into this engine's weights (kept base: merged out of place)."""
        from trainers.adapters.lora_io import merged_from_lora_dir  # PEFT stays in trainers/adapters

        if not hasattr(self, "_base"):
            self._base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.push_weights(merged_from_lora_dir(self._base, adapter_dir).items(), version)

    def close(self) -> None:
        self.model = None


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attention[i, width - len(s):] = 1
    return ids, attention


def _sampled_logprobs(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[R, L] log-softmax(logits / T) of each sampled token, in fp32 (the raw, unprocessed logits)."""
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    for t, logits in enumerate(step_logits):
        scaled = logits.float().cpu() / temperature  # [R, V]
        out[:, t] = scaled.gather(1, tokens[:, t:t + 1]).squeeze(1) - torch.logsumexp(scaled, dim=-1)
    return out


def _cut(tokens: list[int], eos_ids: list[int], pad_id: int, params: SamplingParams, tokenizer: Any) -> tuple[int, str]:
    """How many tokens to keep (through the first EOS) and the finish reason."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return i + 1, "stop"
    if params.stop:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if any(s in text for s in params.stop):
            while tokens and tokens[-1] == pad_id and pad_id not in eos_ids:
                tokens = tokens[:-1]
            return len(tokens), "stop"
    return len(tokens), "length"


ROLLOUT_BACKENDS.register("hf")(HFEngine.from_config)
