"""`backend: hf`: batched transformers decoding with a KV cache (the portable CPU default).

Why a decode loop of our own instead of `model.generate`:
- sampling, the sampled token's logprob and per-row seeds come from one fp32 pass over each step's
  logits [R, V] (generate's `output_logits` would keep every step's [R, V] logits alive);
- the model's generation_config cannot slip extra logits processors in (vLLM ignores them too);
- finished rows are dropped from the batch and the KV cache, so a round does not keep decoding
  rows that already hit EOS or a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.models import load_causal_lm, load_tokenizer
from rl.registries import ROLLOUT_BACKENDS
from rl.types import Prompt, SamplingParams
from rollout.engine import Sample, build_batch, check_prompts, merge_lora, request_seeds
from rollout.infinite_sampling import InfiniteSampler
from rollout.slot_decode import model_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rl.config.rollout import RolloutConfig


class HFEngine:
    """Samples with a transformers causal LM. Given the learner's own model (local sync mode) it needs
    no weight sync; otherwise it holds its own copy, updated in place by `push_weights`."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 64,
                 max_prompt_tokens: int = 512, infinite: InfiniteSampler | None = None) -> None:
        self._model: torch.nn.Module | None = model
        self.tokenizer, self.infinite = tokenizer, infinite
        self.max_batch_size, self.max_prompt_tokens = max_batch_size, max_prompt_tokens
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context = int(getattr(model.config, "max_position_embeddings", None) or 4096)
        self.policy_version = 0
        self._base: dict[str, torch.Tensor] | None = None  # pre-LoRA weights, kept on the first push_lora

    @property
    def model(self) -> torch.nn.Module:
        assert self._model is not None, "the HF engine is closed"
        return self._model

    @classmethod
    def from_config(cls, rollout_cfg: RolloutConfig, model_dir: str, dtype: str, device: str, seed: int,
                    model: torch.nn.Module | None = None, max_lora_rank: int | None = None) -> HFEngine:
        """The registry's factory. `seed` is unused: every `generate` call carries its own seed."""
        if model is None:
            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            model = load_causal_lm(model_dir, dtype, device).eval().requires_grad_(False)
        infinite = InfiniteSampler(rollout_cfg.infinite_sampling) if rollout_cfg.infinite_sampling.enabled else None
        return cls(model, load_tokenizer(model_dir), rollout_cfg.hf.max_batch_size, rollout_cfg.max_prompt_tokens,
                   infinite)

    # ----- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        """group_size rows per prompt (contiguous), decoded in rounds of at most max_batch_size rows."""
        check_prompts(prompts, params, self.max_prompt_tokens, self.context)
        seeds = request_seeds(prompts, params.seed)
        rows = [(g, p, seeds[g] + j) for g, p in enumerate(prompts) for j in range(params.group_size)]
        samples: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        try:
            if self.infinite is not None:  # slot refilling, bounded concurrency: rollout/infinite_sampling.py
                samples = self.infinite.generate(self.model, rows, params, _Sampler(params, [s for *_, s in rows]),
                                                 _Stopper(self.tokenizer, self.eos_ids, params.stop))
            else:
                for start in range(0, len(rows), self.max_batch_size):
                    samples.extend(self._round(rows[start:start + self.max_batch_size], params))
        finally:
            self.model.train(was_training)
        return build_batch(samples, self.tokenizer, self.pad_id, self.policy_version)

    def _round(self, rows: list[tuple[int, Prompt, int]], params: SamplingParams) -> list[Sample]:
        ids, attention = _left_pad([p.token_ids for _, p, _ in rows], self.pad_id)
        sampler = _Sampler(params, [s for _, _, s in rows])
        stopper = _Stopper(self.tokenizer, self.eos_ids, params.stop)
        with torch.inference_mode():
            out = _decode(self.model, ids, attention, sampler, stopper, params.max_new_tokens)
        return [Sample(p, g, tuple(out.tokens[i, :n].tolist()), tuple(out.logprobs[i, :n].tolist()), out.reasons[i])
                for i, ((g, p, _), n) in enumerate(zip(rows, out.lengths.tolist()))]

    # ----- weights ---------------------------------------------------------------------------
    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> float:
        """Copy full weights in place (names must be this model's state-dict keys); seconds spent."""
        start = time.perf_counter()
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"push_weights: {name!r} is not a weight of this model")
                state[name].copy_(tensor)
        self.policy_version = version
        return time.perf_counter() - start

    def push_lora(self, adapter_dir: str, version: int) -> float:
        """Merge a PEFT LoRA directory into this engine's weights: W0 + scale B A, from the weights as
        they were before the first adapter (kept), so successive adapters never stack."""
        start = time.perf_counter()
        if self._base is None:
            self._base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        merged = merge_lora(self._base, adapter_dir)
        self.push_weights(merged.items(), version)
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Nothing to free: the model stays loaded (it may be the learner's own)."""

    def wake(self) -> None:
        """Nothing to restore (see `sleep`)."""

    def close(self) -> None:
        self._model, self._base = None, None


# ----- decoding --------------------------------------------------------------------------------
@dataclass
class _Decoded:
    tokens: torch.Tensor    # [R, L] long, sampled tokens (garbage after each row's length)
    logprobs: torch.Tensor  # [R, L] f32
    lengths: torch.Tensor   # [R] long, tokens kept per row (through EOS / the stop string)
    reasons: list[str]      # R finish reasons


def _decode(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, sampler: _Sampler, stopper: _Stopper,
            max_new: int) -> _Decoded:
    """Decode up to max_new tokens for R left-padded prompts ids [R, P] with a KV cache.

    Rows leave the batch (and the cache) once enough of them are finished, so late steps only run
    the rows still going.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    r = ids.shape[0]
    tokens = torch.full((r, max_new), -1, dtype=torch.long)
    logprobs = torch.zeros((r, max_new), dtype=torch.float32)
    lengths = torch.full((r,), max_new, dtype=torch.long)
    reasons = ["length"] * r
    live = torch.arange(r)                            # [A] original row of each batch row
    done = torch.zeros(r, dtype=torch.bool)           # [R]
    mask = attention.to(device)                       # [A, P + step]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model_config(model))
    logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    next_pos = positions[:, -1] + 1
    for step in range(max_new):
        tok, lp = sampler(logits, live)               # [A], [A]
        tokens[live, step], logprobs[live, step] = tok.cpu(), lp.cpu()
        for i, reason in stopper(tokens, live, step):
            if not done[i]:
                done[i], lengths[i], reasons[i] = True, step + 1, reason
        if step + 1 == max_new or bool(done[live].all()):
            break
        stale = done[live]                            # finished rows still in the batch
        if int(stale.sum()) * 8 >= len(live):        # compacting copies the cache: only when worth it
            keep = (~stale).nonzero().squeeze(1).to(device)
            cache.reorder_cache(keep)  # type: ignore[arg-type]  # a long Tensor is what LongTensor means
            live, tok, mask, next_pos = live[keep.cpu()], tok[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return _Decoded(tokens, logprobs, lengths, reasons)


class _Sampler:
    """Draws one token per row from softmax(truncate(logits / T)) and returns its fp32 logprob.

    Each row has its own torch.Generator (seeded per request and sample), so a row's tokens do not
    depend on which other rows share its batch. Inverse-CDF sampling needs one uniform per row,
    not one random number per vocabulary entry.
    """

    def __init__(self, params: SamplingParams, seeds: Sequence[int]) -> None:
        self.params = params
        self.generators = [torch.Generator().manual_seed(s % (2 ** 63)) for s in seeds]

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [A, V] for the rows `live` [A] -> sampled tokens [A] long, their logprobs [A] f32."""
        p = self.params
        if p.greedy:
            scaled = logits.float()                   # [A, V]
            tok = scaled.argmax(-1)
        else:
            scaled = _truncate(logits.float() / p.temperature, p.top_k, p.top_p)
            lse = torch.logsumexp(scaled, -1, keepdim=True)
            cdf = (scaled - lse).exp_().cumsum_(-1)  # [A, V]
            u = torch.tensor([torch.rand((), generator=self.generators[i]).item() for i in live.tolist()],
                             dtype=cdf.dtype, device=cdf.device)
            # right=True never lands on a zero-probability (masked) token; clamp guards fp32 rounding at 1.
            tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            tok = tok.clamp_(max=scaled.shape[-1] - 1)
            return tok, (scaled.gather(1, tok[:, None]) - lse).squeeze(1)
        return tok, (scaled.gather(1, tok[:, None]) - torch.logsumexp(scaled, -1, keepdim=True)).squeeze(1)


def _truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [A, V] outside the top-k and the top-p nucleus to -inf (vLLM's semantics)."""
    if top_k > 0 and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p    # mass before a token already reaches top_p
        outside[:, 0] = False
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return scaled


class _Stopper:
    """Which rows finished at this step: EOS, or a stop string completed in the decoded text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        # Tokens to re-decode per check: enough to hold the longest stop string even if some tokens
        # decode to nothing (special tokens) or to partial UTF-8 bytes.
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 8

    def __call__(self, tokens: torch.Tensor, live: torch.Tensor, step: int) -> list[tuple[int, str]]:
        """tokens [R, L]; live [A] rows decoded this step -> [(row, "stop")] for rows that finished."""
        finished = live[torch.isin(tokens[live, step], self.eos)].tolist()
        if self.stop:
            tails = tokens[live, max(0, step + 1 - self.window): step + 1].tolist()
            texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
            finished += [row for row, text in zip(live.tolist(), texts) if any(s in text for s in self.stop)]
        return [(row, "stop") for row in finished]


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model's generation config plus the tokenizer's (vLLM stops on both too)."""
    generation = model.generation_config
    ids = getattr(generation, "eos_token_id", None) if generation is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [R, P] and attention [R, P] long, prompts aligned to the right edge."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attention[i, width - len(s):] = 1
    return ids, attention


ROLLOUT_BACKENDS.register("hf")(HFEngine.from_config)
