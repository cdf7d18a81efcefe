"""Turning peers' decoded rollouts into this node's training rows, and mixing I local + J external groups.

Re-tokenisation (ALGORITHMS.md §9.2, genrl `grpo_trainer.py`): the receiver renders the shared user
message with its own chat template (`envs.base.render_prompt`) and tokenises each completion text with
its own tokenizer, so nodes with different models and tokenizers can share. A completion the sender
finished with "stop" gets the receiver's EOS token appended (the receiver learns to stop there too);
one longer than the receiver's `max_new_tokens` is cut there and marked "length".

Sampling logprobs of external rows are left at 0 here; the node fills them with the learner's own
logprobs (rl/swarm/node.py), which makes them the old policy: ratio 1, mismatch weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from envs.base import render_prompt, stable_id
from rl.batch import RolloutBatch
from rl.swarm.exchange import SharedRollout
from rollout.engine import Sample, build_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _completion_ids(tokenizer: PreTrainedTokenizerBase, text: str, finish_reason: str,
                    max_new_tokens: int) -> tuple[list[int], str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) >= max_new_tokens:
        return ids[:max_new_tokens], "length"
    if finish_reason == "stop" and tokenizer.eos_token_id is not None:
        ids = [*ids, int(tokenizer.eos_token_id)]
    return ids, finish_reason


def external_batch(rollouts: Sequence[SharedRollout], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                   max_prompt_tokens: int, policy_version: int) -> tuple[RolloutBatch | None, int]:
    """(a RolloutBatch with one group per rollout, number of rollouts whose prompt is too long here)."""
    samples: list[Sample] = []
    too_long = 0
    for rollout in rollouts:
        prompt = render_prompt(tokenizer, rollout.question, None, stable_id("swarm", *rollout.key), rollout.meta)
        if not prompt.token_ids or len(prompt.token_ids) > max_prompt_tokens:
            too_long += 1
            continue
        group = len({s.group for s in samples})
        for text, reason in zip(rollout.completions, rollout.finish_reasons):
            ids, reason = _completion_ids(tokenizer, text, reason, max_new_tokens)
            samples.append(Sample(prompt=prompt, group=group, token_ids=tuple(ids), logprobs=(0.0,) * len(ids),
                                  finish_reason=reason))
    if not samples:
        return None, too_long
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_batch(samples, tokenizer, int(pad or 0), policy_version), too_long


def first_groups(batch: RolloutBatch, count: int) -> RolloutBatch | None:
    """The first `count` groups of a batch (the local share I), None when count is 0 or none are left."""
    bounds = batch.group_bounds()[:count]
    if not bounds:
        return None
    return batch if len(bounds) == batch.num_groups else batch.select(list(range(bounds[0][0], bounds[-1][1])))


def uniform_groups(batch: RolloutBatch) -> list[int]:
    """Indices of groups whose rewards are all equal (zero group-relative advantage)."""
    assert batch.rewards is not None
    return [g for g, (s, e) in enumerate(batch.group_bounds()) if bool((batch.rewards[s:e] == batch.rewards[s]).all())]


def drop_groups(batch: RolloutBatch, groups: Sequence[int]) -> RolloutBatch | None:
    bounds = [b for g, b in enumerate(batch.group_bounds()) if g not in set(groups)]
    rows = [r for s, e in bounds for r in range(s, e)]
    return batch.select(rows) if rows else None


def mix(parts: Sequence[RolloutBatch | None], pad_token_id: int) -> RolloutBatch | None:
    """Local then external rows as one batch (groups stay whole and distinct)."""
    present = [p for p in parts if p is not None and p.num_samples]
    if not present:
        return None
    return present[0] if len(present) == 1 else RolloutBatch.concat(present, pad_token_id=pad_token_id)
