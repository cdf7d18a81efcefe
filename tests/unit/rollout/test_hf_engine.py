import pytest
import torch
from common import mean_abs_logprob_diff, prompts_for

from rl.config import load_job
from rl.errors import UserError
from rl.models import load_causal_lm
from rl.types import Prompt, SamplingParams
from rollout.engine import build_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)


def test_batch_contract_groups_and_token_in_token_out(engine, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=3)
    batch = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=6, seed=1))
    batch.validate()
    assert batch.num_samples == 12 and batch.num_groups == 3
    for i in range(12):
        p = prompts[i // 4]
        assert batch.input_ids[i, : len(p.token_ids)].tolist() == list(p.token_ids)  # prompt ids untouched
        assert batch.sample_meta[i]["answer"] == p.meta["answer"]
    assert set(batch.finish_reasons) <= {"stop", "length"}


def test_seeded_sampling_is_reproducible_and_seed_sensitive(engine, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=2)
    a = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=6, seed=5))
    b = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=6, seed=5))
    c = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=6, seed=6))
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_the_learner(engine, tiny_model_dir, temperature):
    prompts = prompts_for(tiny_model_dir, count=4)
    batch = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=8, temperature=temperature, seed=2))
    diff = mean_abs_logprob_diff(engine.model, batch, temperature)
    print(f"hf engine vs learner logprobs, T={temperature}: mean |diff| = {diff:.2e}")
    assert diff < 1e-3


def test_push_weights_changes_outputs_and_restores(engine, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=4)
    params = SamplingParams(group_size=2, max_new_tokens=8, seed=3)
    before = engine.generate(prompts, params)
    original = {k: v.clone() for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
    torch.manual_seed(0)
    engine.push_weights(((k, v + 0.5 * torch.randn_like(v)) for k, v in original.items()), version=1)
    changed = engine.generate(prompts, params)
    assert changed.policy_version == 1 and not torch.equal(changed.input_ids, before.input_ids)
    engine.push_weights(original.items(), version=2)
    assert torch.equal(engine.generate(prompts, params).input_ids, before.input_ids)


def test_too_long_prompt_is_a_clear_error(engine):
    prompt = Prompt("long", "x", tuple(range(10)) * 100, {})
    with pytest.raises(UserError, match="max_prompt_tokens"):
        engine.generate([prompt], SamplingParams(max_new_tokens=4))
