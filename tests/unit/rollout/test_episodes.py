"""Multi-turn episodes over the real engines (rollout/episodes.py): three model turns with env answers in
between, token-in/token-out. The learner's log-probs of every sampled token equal the sampler's (maximum
difference), the loss mask covers exactly the model's tokens, and a greedy episode is the same on hf and vLLM."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from common import learner_logprobs, prompts_for

from rl.config import load_job
from rl.models import load_causal_lm, load_tokenizer
from rl.types import Prompt, SamplingParams, StepResult
from rollout.engine import build_engine
from rollout.episodes import EpisodeRollout, episode_metrics

TURNS = 3


class Scripted:
    """An env that answers the first TURNS-1 turns with fixed tokens and ends the episode at turn TURNS,
    recording what it saw (so the test knows each turn's tokens)."""

    def __init__(self, answer: Sequence[int]) -> None:
        self.answer, self.seen = tuple(answer), []

    def reset(self, prompt: Prompt) -> None:
        self.seen = []

    def step(self, turn_ids: Sequence[int]) -> StepResult:
        self.seen.append(list(turn_ids))
        if len(self.seen) == TURNS:
            return StepResult(done=True, info={"calls": TURNS - 1})
        return StepResult(observation_ids=self.answer, info={"calls": len(self.seen)})


def _episodes(engine, tokenizer, envs: list[Scripted], answer: Sequence[int], max_total: int = 200):
    def new_env() -> Scripted:
        envs.append(Scripted(answer))
        return envs[-1]

    return EpisodeRollout(engine, tokenizer, new_env, max_turns=TURNS + 1, max_total_tokens=max_total,
                          max_prompt_tokens=512)


def _check_episodes(batch, envs: list[Scripted], answer: Sequence[int]) -> None:
    """Each row is [prompt][turn 1][answer][turn 2][answer][turn 3]; the mask is True exactly on the turns."""
    batch.validate()
    for i, env in enumerate(envs):
        assert len(env.seen) == TURNS and batch.sample_meta[i]["turns"] == TURNS
        expected_ids, expected_mask = [], []
        for k, turn in enumerate(env.seen):
            expected_ids += turn
            expected_mask += [True] * len(turn)
            if k < TURNS - 1:
                expected_ids += list(answer)
                expected_mask += [False] * len(answer)
        p, n = int(batch.prompt_lengths[i]), len(expected_ids)
        assert batch.input_ids[i, p:p + n].tolist() == expected_ids  # exactly the sampled and returned tokens
        assert batch.loss_mask[i, p:p + n].tolist() == expected_mask
        assert not batch.loss_mask[i, :p].any() and not batch.loss_mask[i, p + n:].any()
        assert (batch.sampling_logprobs[i][~batch.loss_mask[i]] == 0).all()


def _max_logprob_diff(model, batch, temperature: float) -> float:
    mask = batch.loss_mask
    return float((learner_logprobs(model, batch, temperature) - batch.sampling_logprobs).abs()[mask].max())


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)


def test_three_turn_episodes_on_hf_train_on_exactly_the_sampled_tokens(hf, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    answer = tokenizer("<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
    envs: list[Scripted] = []
    prompts = prompts_for(tiny_model_dir, count=3)
    batch = _episodes(hf, tokenizer, envs, answer).generate(
        prompts, SamplingParams(group_size=2, max_new_tokens=5, temperature=1.0, seed=3))
    assert batch.num_samples == 6 and batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]  # groups: one prompt's episodes
    _check_episodes(batch, envs, answer)
    diff = _max_logprob_diff(hf.model, batch, 1.0)
    print(f"hf, {TURNS}-turn episodes: max |learner - sampler| logprob = {diff:.2e}")
    assert diff < 1e-4
    metrics = episode_metrics(batch)
    assert metrics["agent/turns_mean"] == TURNS and metrics["agent/tool_calls_mean"] == TURNS - 1


def test_an_episode_does_not_depend_on_the_others_in_the_call(hf, tiny_model_dir):
    """Later turns are seeded per (episode, turn): the same prompt gives the same episode alone or in a batch."""
    tokenizer = load_tokenizer(tiny_model_dir)
    answer = tokenizer("ok", add_special_tokens=False)["input_ids"]
    prompts = prompts_for(tiny_model_dir, count=3)
    params = SamplingParams(group_size=2, max_new_tokens=4, seed=9)
    together = _episodes(hf, tokenizer, [], answer).generate(prompts, params)
    alone = _episodes(hf, tokenizer, [], answer).generate(prompts[1:2], params)
    assert together.input_ids[2:4, : alone.seq_len].tolist() == alone.input_ids.tolist()


def test_budgets_end_episodes_with_a_reason(hf, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    answer = tokenizer("ok ok ok", add_special_tokens=False)["input_ids"]
    prompts = prompts_for(tiny_model_dir, count=2)
    params = SamplingParams(group_size=1, max_new_tokens=4, seed=1)
    short = _episodes(hf, tokenizer, [], answer, max_total=6).generate(prompts, params)
    assert set(short.finish_reasons) == {"length"}
    assert {m["truncation"] for m in short.sample_meta} == {"token_budget"}
    assert int(short.attention_mask.sum(1).max() - short.prompt_lengths.max()) <= 6
    turns = EpisodeRollout(hf, tokenizer, lambda: Scripted(answer), max_turns=2, max_total_tokens=100,
                           max_prompt_tokens=512).generate(prompts, params)
    assert {m["truncation"] for m in turns.sample_meta} == {"max_turns"}
    assert {m["turns"] for m in turns.sample_meta} == {2}
    assert episode_metrics(turns)["agent/truncated_max_turns_frac"] == 1.0


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_episodes_match_the_learner_and_the_hf_engine(hf, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    answer = tokenizer("<|im_end|>\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
    vllm = build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, tiny_model_dir, "float32", "cpu", 0)
    try:
        torch.manual_seed(1)  # perturbed weights: varied greedy text to compare
        weights = {k: v + 0.3 * torch.randn_like(v) for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
        vllm.push_weights(weights.items(), 1)
        hf.push_weights(weights.items(), 1)
        prompts = prompts_for(tiny_model_dir, count=3)
        envs: list[Scripted] = []
        sampled = _episodes(vllm, tokenizer, envs, answer).generate(
            prompts, SamplingParams(group_size=2, max_new_tokens=5, temperature=1.0, seed=4))
        _check_episodes(sampled, envs, answer)
        diff = _max_logprob_diff(hf.model, sampled, 1.0)
        print(f"vLLM, {TURNS}-turn episodes: max |learner - sampler| logprob = {diff:.2e}")
        assert diff < 1e-3
        greedy = SamplingParams(group_size=1, max_new_tokens=6, greedy=True)
        a = _episodes(vllm, tokenizer, [], answer).generate(prompts, greedy)
        b = _episodes(hf, tokenizer, [], answer).generate(prompts, greedy)
        assert len(set(a.completion_texts)) > 1 and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.loss_mask, b.loss_mask)
    finally:
        vllm.close()
        hf.push_weights(load_causal_lm(tiny_model_dir).state_dict().items(), 0)


def test_a_prefill_starts_every_first_turn_as_context(hf, tiny_model_dir):
    """agent.prefill: its tokens follow the prompt untrained, the model continues them, the env parses
    prefill + turn 1, and the rewards' `final_turn` is the model's last turn alone."""
    tokenizer = load_tokenizer(tiny_model_dir)
    answer = tokenizer(" ok", add_special_tokens=False)["input_ids"]
    prefill = '<tool_call>{"name": "calculator", "arguments": {"expression": "'
    pre = tokenizer(prefill, add_special_tokens=False)["input_ids"]
    envs: list[Scripted] = []

    def new_env() -> Scripted:
        envs.append(Scripted(answer))
        return envs[-1]

    rollout = EpisodeRollout(hf, tokenizer, new_env, max_turns=TURNS + 1, max_total_tokens=200,
                             max_prompt_tokens=512, prefill=prefill)
    batch = rollout.generate(prompts_for(tiny_model_dir, count=2),
                             SamplingParams(group_size=2, max_new_tokens=5, temperature=1.0, seed=4))
    batch.validate()
    for i, env in enumerate(envs):
        assert env.seen[0][: len(pre)] == pre and len(env.seen[0]) > len(pre)  # the env reads prefill + turn 1
        p = int(batch.prompt_lengths[i])
        assert batch.input_ids[i, p:p + len(pre)].tolist() == pre
        assert not batch.loss_mask[i, p:p + len(pre)].any() and batch.loss_mask[i, p + len(pre)]
        assert batch.completion_texts[i].startswith(prefill)
        turns = [tokenizer.decode(t, skip_special_tokens=True) for t in env.seen]
        assert batch.sample_meta[i]["turn_texts"] == turns and batch.sample_meta[i]["final_turn"] == turns[-1]
    assert _max_logprob_diff(hf.model, batch, 1.0) < 1e-4
