"""Tiny models and synthetic batches built in code (no engine, no download), shared by the trainer tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl.batch import RolloutBatch


def build_lm(vocab: int = 64, hidden: int = 32, layers: int = 2, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def build_batch(prompt_lengths: list[int], completion_lengths: list[int], group_size: int, vocab: int = 64,
                rewards: list[float] | None = None, seed: int = 0) -> RolloutBatch:
    """Right-padded [prompt][completion][pad] rows with random tokens; groups of `group_size` contiguous rows.
    sampling_logprobs are random near-zero numbers (a sampler that disagrees slightly with the learner)."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompt_lengths)
    width = max(p + c for p, c in zip(prompt_lengths, completion_lengths))
    ids = torch.zeros(n, width, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.bool)
    loss = torch.zeros(n, width, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        ids[i, : p + c] = torch.randint(1, vocab, (p + c,), generator=g)
        attn[i, : p + c] = True
        loss[i, p: p + c] = True
    sampling = torch.where(loss, -torch.rand(n, width, generator=g) * 3, torch.zeros(n, width))
    batch = RolloutBatch(
        input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=sampling,
        prompt_lengths=torch.tensor(prompt_lengths), group_ids=torch.arange(n) // group_size, policy_version=0,
        finish_reasons=["stop"] * n, prompt_texts=[""] * n, completion_texts=[""] * n, sample_meta=[{}] * n)
    if rewards is not None:
        batch = batch.with_rewards(torch.tensor(rewards))
    return batch.validate()


def record_updates(trainer) -> list[torch.Tensor]:
    """The gradient AdamW gets (after clipping) at every update `trainer` makes after this call, flattened over
    the trainable parameters; the returned list fills as the updates happen.

    Compare two runs by these, not by their weights: AdamW's first steps move each weight by about
    lr * g / (|g| + 1e-8), so an entry whose gradient is near the rounding error of the largest ones (measured:
    |g| = 3.5e-9 next to 4e-2) moves by a rounding-driven fraction of lr, and gradients equal to 1e-7 of their
    scale give weights ~1e-6 apart, by an amount that changes with the thread count and kernels."""
    seen: list[torch.Tensor] = []

    def record(optimizer, args, kwargs) -> None:
        seen.append(torch.cat([p.grad.detach().flatten().clone() for g in optimizer.param_groups
                               for p in g["params"]]))

    trainer.optimizer.register_step_pre_hook(record)
    return seen


def assert_same_updates(expected: list[torch.Tensor], got: list[torch.Tensor], rtol: float) -> None:
    """As many updates, each gradient within rtol of its largest entry (float32 rounding: ~1e-7 of it)."""
    assert len(expected) == len(got) > 0, (len(expected), len(got))
    for step, (a, b) in enumerate(zip(expected, got)):
        scale = float(a.abs().max())
        assert scale > 0 and float((a - b).abs().max()) <= rtol * scale, (step, float((a - b).abs().max()), scale)


def chat_batch(tokenizer, groups: list[tuple[str, list[str]]]) -> RolloutBatch:
    """One group per (question, completions): chat-templated prompt + completion + EOS, right-padded."""
    rows, prompt_lengths, group_ids = [], [], []
    for g, (question, completions) in enumerate(groups):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        for text in completions:
            completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt + completion)
            prompt_lengths.append(len(prompt))
            group_ids.append(g)
    n, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((n, width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.bool)
    loss = torch.zeros(n, width, dtype=torch.bool)
    for i, (row, p) in enumerate(zip(rows, prompt_lengths)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = True
        loss[i, p: len(row)] = True
    return RolloutBatch(
        input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=torch.zeros(n, width),
        prompt_lengths=torch.tensor(prompt_lengths), group_ids=torch.tensor(group_ids), policy_version=0,
        finish_reasons=["stop"] * n, prompt_texts=[""] * n, completion_texts=[""] * n, sample_meta=[{}] * n).validate()
