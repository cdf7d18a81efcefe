"""Two-stage sampling for GRPO-MA (Wang et al., arXiv 2509.24494): K thoughts per prompt, then M answers
per thought, on top of any engine that implements `rl.types.RolloutEngine` (hf, vllm).

    stage 1: engine.generate(prompts, group_size=K, stop=[..., delimiter])   -> K thoughts per prompt
    stage 2: engine.generate(prompt + thought tokens, group_size=M)          -> M answers per thought

Token-in/token-out: stage 2's prompts are the stage-1 prompt ids followed by the thought's sampled ids,
never re-tokenised text. The result has K*M rows per prompt, thought-major (row k*M + m is answer m of
thought k), one group per prompt. Every row is [prompt][thought][answer]:
    loss_mask          thought tokens in the thought's first row only (m = 0), answer tokens in every row,
                       so each thought's logprobs are computed and trained once, not M times;
    sampling_logprobs  the thought's from stage 1, the answer's from stage 2;
    sample_meta        the prompt's fields plus `grpo_ma = {thought, answer, thought_tokens, complete}`.
A thought that ends without the delimiter (EOS or the token budget) gets no answers: its M rows carry the
thought alone with `complete = False`; the advantage step (trainers/grpo_ma.py) gives the thought value 0
and leaves its rows out of the answer normalisation (ALGORITHMS.md §3.5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from rl.batch import RolloutBatch
from rl.types import Prompt, RolloutEngine, SamplingParams
from rollout.engine import Sample, build_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

META_KEY = "grpo_ma"
# Stage 2 draws with its own seed stream so answers never reuse the thoughts' random numbers.
ANSWER_SEED_OFFSET = 0x5EED


@runtime_checkable
class _WithTokenizer(Protocol):
    """What stage 2 needs beyond `RolloutEngine`: the tokenizer that decodes the joined rows (hf, vllm have it)."""

    tokenizer: PreTrainedTokenizerBase


def thought_params(params: SamplingParams) -> SamplingParams:
    """Stage 1: K = group_size thoughts, stopped at (and including) the delimiter."""
    spec = params.multi_answer
    assert spec is not None, "thought_params needs params.multi_answer"
    stop = tuple(params.stop) + ((spec.delimiter,) if spec.delimiter not in params.stop else ())
    return dataclasses.replace(params, stop=stop, multi_answer=None)


def answer_params(params: SamplingParams) -> SamplingParams:
    """Stage 2: M answers per thought with the answer budget and the user's own stop strings."""
    spec = params.multi_answer
    assert spec is not None, "answer_params needs params.multi_answer"
    return dataclasses.replace(params, group_size=spec.answers_per_thought, max_new_tokens=spec.answer_max_new_tokens,
                               seed=params.seed + ANSWER_SEED_OFFSET, multi_answer=None)


def completion(batch: RolloutBatch, row: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(token ids, sampling logprobs) of one row's completion."""
    p, n = int(batch.prompt_lengths[row]), int(batch.attention_mask[row].sum())
    return tuple(batch.input_ids[row, p:n].tolist()), tuple(batch.sampling_logprobs[row, p:n].tolist())


def is_complete(batch: RolloutBatch, row: int, delimiter: str) -> bool:
    """A thought is complete when it stopped on a stop string and its text holds the delimiter."""
    return batch.finish_reasons[row] == "stop" and delimiter in batch.completion_texts[row]


def generate_multi_answer(engine: RolloutEngine, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
    """K*M rows per prompt (see the module docstring); `engine` is any RolloutEngine with a `tokenizer`."""
    spec = params.multi_answer
    if spec is None:
        raise ValueError("generate_multi_answer needs params.multi_answer")
    k, m = params.group_size, spec.answers_per_thought
    thoughts = engine.generate(prompts, thought_params(params))  # [len(prompts) * K rows]
    complete = [is_complete(thoughts, i, spec.delimiter) for i in range(thoughts.num_samples)]
    continued = [i for i, ok in enumerate(complete) if ok]
    answers = None
    if continued:
        answers = engine.generate([_continuation(prompts[i // k], thoughts, i, k) for i in continued],
                                  answer_params(params))
    answer_row = {row: j * m for j, row in enumerate(continued)}  # first answer row of each continued thought
    samples, thought_lengths = [], []
    for g, prompt in enumerate(prompts):
        for t in range(k):
            row = g * k + t
            th_ids, th_lps = completion(thoughts, row)
            for a in range(m):
                if row in answer_row:
                    assert answers is not None  # answer_row is empty unless stage 2 ran
                    ans_ids, ans_lps = completion(answers, answer_row[row] + a)
                    reason = answers.finish_reasons[answer_row[row] + a]
                else:
                    ans_ids, ans_lps, reason = (), (), thoughts.finish_reasons[row]
                meta = {**prompt.meta, META_KEY: {"thought": t, "answer": a, "thought_tokens": len(th_ids),
                                                  "complete": complete[row]}}
                samples.append(Sample(dataclasses.replace(prompt, meta=meta), g, th_ids + ans_ids,
                                      th_lps + ans_lps, reason))
                thought_lengths.append(len(th_ids) if a > 0 else 0)
    assert isinstance(engine, _WithTokenizer), f"{type(engine).__name__} has no tokenizer for GRPO-MA's rows"
    tokenizer = engine.tokenizer
    batch = build_batch(samples, tokenizer, tokenizer.pad_token_id, thoughts.policy_version)
    return batch.replace(loss_mask=_mask_repeated_thoughts(batch, thought_lengths)).validate()


def _continuation(prompt: Prompt, thoughts: RolloutBatch, row: int, k: int) -> Prompt:
    """Stage-2 prompt: the prompt's ids + the thought's sampled ids (no re-tokenisation)."""
    ids, _ = completion(thoughts, row)
    return Prompt(prompt_id=f"{prompt.prompt_id}/thought{row % k}", text=prompt.text + thoughts.completion_texts[row],
                  token_ids=prompt.token_ids + ids, meta=prompt.meta)


def _mask_repeated_thoughts(batch: RolloutBatch, repeated: Sequence[int]) -> torch.Tensor:
    """loss_mask [N, T] without the thought tokens of rows m > 0 (`repeated[i]` tokens after the prompt)."""
    mask = batch.loss_mask.clone()
    for i, n in enumerate(repeated):
        if n:
            p = int(batch.prompt_lengths[i])
            mask[i, p:p + n] = False
    return mask
