"""Slot-based KV-cache decoding: the continuous-sampling half of Infinite Sampling (arXiv 2506.22950).

A fixed number of slots (rows of one transformers `DynamicCache`) decode together. When a sequence
finishes, its slot is refilled at once with the next pending sample, so a step never runs a
half-empty batch while work is pending, and memory is bounded by the slot count, not the group size.

How sequences of different ages share one cache: keys are cached after RoPE, so a key's column in
the cache does not matter, only the attention mask and each row's own `position_ids`. Every row's
sequence is right-aligned to the cache's last column; a new sequence's prompt KV is written into the
last P columns of its row (older columns are masked out), and columns no live row needs any more are
cut from the left. The width therefore stays <= longest prompt + max_new_tokens.

Each prompt is prefilled once per group (`PromptCache`); its KV and first-token logits are copied into
every slot that takes one of its samples, and dropped once the group's last sample has been admitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import torch

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig, PreTrainedTokenizerBase

TokenSampler = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`sampler(logits [A, V], ids [A]) -> (tokens [A] long, logprobs [A] f32)` (the HF engine's `_Sampler`)."""


class StopRule(Protocol):
    """What `stopped` reads from the HF engine's `_Stopper`: EOS ids, stop strings and how many tokens to re-decode."""

    eos: torch.Tensor
    stop: list[str]
    window: int
    tokenizer: PreTrainedTokenizerBase


class KVLayer(Protocol):
    """A full-attention layer of a `DynamicCache` once written: its key and value tensors [R, H, W, D] are set."""

    keys: torch.Tensor
    values: torch.Tensor


def kv_layers(cache: DynamicCache) -> list[KVLayer]:
    # transformers types layers as any cache layer with optional tensors; a causal LM's DynamicCache after a
    # forward holds full-attention layers with both set (the models rollout serves have no linear attention)
    return cast("list[KVLayer]", cache.layers)


def model_config(model: torch.nn.Module) -> PretrainedConfig:
    """The transformers config of `model` (a PreTrainedModel, or a PEFT model wrapping one)."""
    from transformers import PretrainedConfig

    config = model.config
    assert isinstance(config, PretrainedConfig), f"{type(model).__name__} has no transformers config"
    return config


@dataclass
class PromptState:
    """One prompt, prefilled once: per-layer KV [1, H, P, D] and the logits [1, V] of the first token."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    length: int
    remaining: int  # samples of the group not admitted yet


class PromptCache:
    """Prefills each group's prompt once and keeps it only while the group still has samples to start."""

    def __init__(self, model: torch.nn.Module, group_size: int) -> None:
        self.model, self.group_size = model, group_size
        self.states: dict[int, PromptState] = {}
        self.prefills = 0
        self.peak_open = 0

    def take(self, group: int, ids: Sequence[int]) -> PromptState:
        state = self.states.get(group)
        if state is None:
            state = self.states[group] = prefill(self.model, ids, self.group_size)
            self.prefills += 1
            self.peak_open = max(self.peak_open, len(self.states))
        state.remaining -= 1
        if state.remaining == 0:
            del self.states[group]
        return state


def prefill(model: torch.nn.Module, ids: Sequence[int], group_size: int) -> PromptState:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)                     # [1, P]
    cache = DynamicCache(config=model_config(model))
    logits = model(input_ids=x, position_ids=torch.arange(len(ids), device=device)[None], past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]                        # [1, V]
    kv = [(layer.keys, layer.values) for layer in kv_layers(cache)]
    return PromptState(kv, logits, len(ids), group_size)


class SlotBatch:
    """R rows of one KV cache; row r's sequence occupies its last span[r] columns (mask 1 there)."""

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        self.model, self.rows = model, rows
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=self.device)   # [R, W]
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)         # [R] next position id
        self.token = torch.zeros(rows, dtype=torch.long, device=self.device)       # [R] next input token
        self.span = [0] * rows                                                     # valid columns per row
        self.max_width = 0

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def insert(self, row: int, state: PromptState, first_token: int) -> None:
        """Put a new sequence (prompt KV + its first sampled token, fed at the next step) into `row`."""
        if self.cache is None:
            self._create(state)
        if state.length > self.width:
            self._pad_left(state.length - self.width)
        w, p = self.width, state.length
        for layer, (k, v) in zip(self._layers(), state.kv):
            layer.keys[row, :, w - p:] = k[0]
            layer.values[row, :, w - p:] = v[0]
        self.mask[row] = 0
        self.mask[row, w - p:] = 1
        self.pos[row], self.token[row], self.span[row] = p, first_token, p

    def step(self) -> torch.Tensor:
        """Feed every row's pending token; next-token logits [R, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        logits = self.model(input_ids=self.token[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                            past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.pos += 1
        self.span = [s + 1 for s in self.span]
        self.max_width = max(self.max_width, self.width)
        return logits

    def trim(self, live_rows: Sequence[int]) -> None:
        """Drop leading columns no live row attends to (a view: the next step's concatenation copies anyway)."""
        cut = min((self.width - self.span[r] for r in live_rows), default=0)
        if cut > 0:
            for layer in self._layers():
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
            self.mask = self.mask[:, cut:]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in this order): used once nothing is pending, so idle rows stop costing compute."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self._cache().reorder_cache(index)  # type: ignore[arg-type]  # a long Tensor is what LongTensor means
        self.mask, self.pos, self.token = self.mask[index], self.pos[index], self.token[index]
        self.span = [self.span[r] for r in rows]
        self.rows = len(rows)

    def _create(self, state: PromptState) -> None:
        from transformers import DynamicCache

        shape = lambda t: (self.rows, t.shape[1], state.length, t.shape[3])  # noqa: E731  [R, H, P, D]
        data = [(k.new_zeros(shape(k)), v.new_zeros(shape(v))) for k, v in state.kv]
        self.cache = DynamicCache(ddp_cache_data=data, config=model_config(self.model))
        self.mask = torch.zeros((self.rows, state.length), dtype=torch.long, device=self.device)

    def _cache(self) -> DynamicCache:
        assert self.cache is not None, "insert() creates the cache before anything reads it"
        return self.cache

    def _layers(self) -> list[KVLayer]:
        return kv_layers(self._cache())

    def _pad_left(self, extra: int) -> None:
        for layer in self._layers():
            k, v = layer.keys, layer.values
            layer.keys = torch.cat([k.new_zeros((*k.shape[:2], extra, *k.shape[3:])), k], dim=2)
            layer.values = torch.cat([v.new_zeros((*v.shape[:2], extra, *v.shape[3:])), v], dim=2)
        self.mask = torch.cat([self.mask.new_zeros((self.rows, extra)), self.mask], dim=1)


@dataclass
class DecodeStats:
    """What the slot loop did: decode steps (batched forwards), refills, and the concurrency bound."""

    decode_steps: int = 0
    refills: int = 0            # slots re-used by a new sample while other rows kept decoding
    max_concurrent: int = 0     # most sequences decoding at once (never above the slot count)
    max_rows: int = 0           # most rows in a forward (live or idle)
    max_width: int = 0          # widest KV cache, columns
    prefills: int = 0           # prompt prefills (one per group)
    peak_open_prompts: int = 0  # most prompt states held at once
    concurrency: list[int] = field(default_factory=list)  # live sequences at each step
    drain_step: int | None = None  # first step that began with no sample left to start


@dataclass
class Outputs:
    tokens: torch.Tensor    # [N, L] long, sampled tokens (-1 after each row's length)
    logprobs: torch.Tensor  # [N, L] f32
    lengths: torch.Tensor   # [N] long
    reasons: list[str]


def stopped(stopper: StopRule, tokens: torch.Tensor, rows: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Rows (sample ids) whose latest token (at index end-1) is EOS or completes a stop string.

    Same rule as the HF engine's `_Stopper`, with a per-row step since rows here started at different times.
    """
    ids = torch.tensor(list(rows), dtype=torch.long)
    last = tokens[ids, torch.tensor(list(ends), dtype=torch.long) - 1]
    done = set(ids[torch.isin(last, stopper.eos)].tolist())
    if stopper.stop:
        tails = [tokens[r, max(0, e - stopper.window): e].tolist() for r, e in zip(rows, ends)]
        texts = stopper.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done |= {r for r, text in zip(rows, texts) if any(s in text for s in stopper.stop)}
    return [r for r in rows if r in done]


class SlotDecoder:
    """Decodes N samples (sample i: prompt ids[i] of group groups[i]) in at most `slots` concurrent rows.

    next_sample(row) -> sample id or None is the scheduler's refill decision for a freed row.
    sampler(logits [A, V], ids [A]) -> tokens [A], logprobs [A] draws from each sample's own generator.
    """

    def __init__(self, model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], groups: Sequence[int],
                 group_size: int, slots: int, max_new: int) -> None:
        self.prompt_ids, self.groups, self.max_new = prompt_ids, groups, max_new
        n = len(groups)
        self.out = Outputs(torch.full((n, max_new), -1, dtype=torch.long), torch.zeros((n, max_new)),
                           torch.full((n,), max_new, dtype=torch.long), ["length"] * n)
        self.count = [0] * n                       # tokens sampled so far per sample
        self.batch = SlotBatch(model, min(slots, n))
        self.prompts = PromptCache(model, group_size)
        self.row_sample = [-1] * self.batch.rows   # sample decoding in each row (-1 = idle)
        self.stats = DecodeStats()

    def run(self, next_sample: Callable[[int], int | None], sampler: TokenSampler, stopper: StopRule,
            pending: Callable[[], bool]) -> Outputs:
        for row in range(self.batch.rows):
            self._admit(row, next_sample, sampler, stopper)
        while any(s >= 0 for s in self.row_sample):
            live = [r for r, s in enumerate(self.row_sample) if s >= 0]
            ids = [self.row_sample[r] for r in live]
            if self.stats.drain_step is None and not pending():
                self.stats.drain_step = len(self.stats.concurrency)
            self.stats.concurrency.append(len(live))
            self.stats.max_rows = max(self.stats.max_rows, self.batch.rows)
            logits = self.batch.step()[torch.tensor(live, device=self.batch.device)]        # [A, V]
            tok, lp = sampler(logits, torch.tensor(ids))
            self.stats.decode_steps += 1
            self.batch.token[torch.tensor(live, device=self.batch.device)] = tok.to(self.batch.device)
            for sample, t, logprob in zip(ids, tok.tolist(), lp.tolist()):
                self._record(sample, t, logprob)
            finished = set(self._finished(ids, stopper))
            for r in live:
                if self.row_sample[r] in finished:
                    self.row_sample[r] = -1
                    self.stats.refills += int(self._admit(r, next_sample, sampler, stopper))
            self._shrink(pending())
        self._finish_stats()
        return self.out

    def _admit(self, row: int, next_sample: Callable[[int], int | None], sampler: TokenSampler,
               stopper: StopRule) -> bool:
        """Start the next pending sample in `row`; a sample that stops on its first token never takes the row."""
        while (i := next_sample(row)) is not None:
            state = self.prompts.take(self.groups[i], self.prompt_ids[i])
            tok, lp = sampler(state.logits, torch.tensor([i]))
            self._record(i, int(tok[0]), float(lp[0]))
            if self._finished([i], stopper):
                continue
            self.batch.insert(row, state, int(tok[0]))
            self.row_sample[row] = i
            return True
        return False

    def _record(self, sample: int, token: int, logprob: float) -> None:
        k = self.count[sample]
        self.out.tokens[sample, k], self.out.logprobs[sample, k] = token, logprob
        self.count[sample] = k + 1

    def _finished(self, ids: Sequence[int], stopper: StopRule) -> list[int]:
        done = stopped(stopper, self.out.tokens, ids, [self.count[i] for i in ids])
        for i in done:
            self.out.lengths[i], self.out.reasons[i] = self.count[i], "stop"
        full = [i for i in ids if i not in done and self.count[i] >= self.max_new]
        return done + full  # `length` rows keep the default reason and length max_new

    def _shrink(self, more_pending: bool) -> None:
        """Trim dead columns; once nothing is pending, drop idle rows when they are >= 1/8 of the batch."""
        live = [r for r, s in enumerate(self.row_sample) if s >= 0]
        if not live:
            return
        idle = self.batch.rows - len(live)
        if not more_pending and idle and idle * 8 >= self.batch.rows:
            self.batch.keep(live)
            self.row_sample = [self.row_sample[r] for r in live]
            live = list(range(len(live)))
        self.batch.trim(live)

    def _finish_stats(self) -> None:
        s = self.stats
        s.max_concurrent = max(s.concurrency, default=0)
        s.max_width, s.prefills = self.batch.max_width, self.prompts.prefills
        s.peak_open_prompts = self.prompts.peak_open
