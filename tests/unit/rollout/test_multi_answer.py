"""GRPO-MA two-stage sampling (rollout/multi_answer.py) on real engines: hf (fast) and vLLM (marked)."""

from collections import Counter

import pytest
import torch
from common import prompts_for

from rl.config import load_job
from rl.types import MultiAnswerSpec, SamplingParams
from rollout.engine import build_engine
from rollout.multi_answer import META_KEY, generate_multi_answer

K, M = 3, 2


def _delimiter(engine, prompts, base: SamplingParams) -> str:
    """A delimiter this random tiny model does produce, chosen deterministically from its own seeded sample
    (stage 1 draws the same thoughts): the alphanumeric character found in the most completions, past their
    first two characters, preferring one that some completions lack, so the test covers thoughts that reach it
    and, where the sample allows, some that do not. Ties go to the smaller character."""
    texts = [text[2:] for text in engine.generate(prompts, base).completion_texts]
    found = Counter(ch for text in texts for ch in set(text) if ch.isascii() and ch.isalnum())
    assert found, f"the tiny model produced no alphanumeric character to use as a delimiter: {texts}"
    return min(found, key=lambda ch: (found[ch] == len(texts), -found[ch], ch))


def _check_batch(batch, prompts, spec):
    """The contract of the module docstring: K*M rows per prompt, [prompt][thought][answer] rows, thought
    tokens trainable once per thought, logprobs from the stage that sampled them."""
    assert batch.num_samples == len(prompts) * K * M
    assert batch.num_groups == len(prompts)
    assert batch.group_ids.tolist() == [g for g in range(len(prompts)) for _ in range(K * M)]
    completes = 0
    for i in range(batch.num_samples):
        info = batch.sample_meta[i][META_KEY]
        g, t, a = i // (K * M), (i // M) % K, i % M
        assert (info["thought"], info["answer"]) == (t, a)
        p, n, th = int(batch.prompt_lengths[i]), int(batch.attention_mask[i].sum()), info["thought_tokens"]
        assert batch.input_ids[i, :p].tolist() == list(prompts[g].token_ids)  # token-in: prompt ids untouched
        first = i - a
        # every answer row of a thought carries the same thought tokens and logprobs
        assert torch.equal(batch.input_ids[i, p:p + th], batch.input_ids[first, p:p + th])
        assert torch.equal(batch.sampling_logprobs[i, p:p + th], batch.sampling_logprobs[first, p:p + th])
        assert bool(batch.loss_mask[i, p:p + th].all()) == (a == 0)
        assert bool(batch.loss_mask[i, p + th:n].all())
        thought_text = batch.completion_texts[i]
        if info["complete"]:
            completes += 1
            assert spec.delimiter in thought_text
            assert 0 < n - p - th <= spec.answer_max_new_tokens
            assert bool((batch.sampling_logprobs[i, p:n] < 0).all())
        else:
            assert n - p == th  # no answer after a thought that never reached the delimiter
    return completes


def _run(engine, prompts, seed=3):
    base = SamplingParams(group_size=K, max_new_tokens=16, temperature=1.0, seed=seed)
    spec = MultiAnswerSpec(answers_per_thought=M, delimiter=_delimiter(engine, prompts, base),
                           answer_max_new_tokens=5)
    params = SamplingParams(group_size=K, max_new_tokens=16, temperature=1.0, seed=seed, multi_answer=spec)
    return generate_multi_answer(engine, prompts, params), spec, params


def test_hf_two_stage_batch_is_valid_and_continues_the_thought_tokens(tiny_model_dir):
    engine = build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", 0)
    prompts = prompts_for(tiny_model_dir, count=2)
    batch, spec, params = _run(engine, prompts)
    assert _check_batch(batch, prompts, spec) > 0
    # stage 2 continued from prompt + thought *tokens*: re-scoring each answer with the model conditioned on
    # exactly those ids reproduces the sampler's logprobs
    from common import learner_logprobs

    lp = learner_logprobs(engine.model, batch, temperature=1.0)
    assert torch.allclose(lp[batch.loss_mask], batch.sampling_logprobs[batch.loss_mask], atol=1e-4)
    # reproducible from the seed
    again = generate_multi_answer(engine, prompts, params)
    assert torch.equal(again.input_ids, batch.input_ids)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_two_stage_batch_is_valid(tiny_model_dir):
    engine = build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, tiny_model_dir, "float32", "cpu", 0)
    try:
        prompts = prompts_for(tiny_model_dir, count=2)
        batch, spec, _ = _run(engine, prompts)
        assert _check_batch(batch, prompts, spec) > 0
    finally:
        engine.close()
