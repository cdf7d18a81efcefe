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
    assert len({tuple(r) for r in a.input_ids[:4].tolist()}) > 1  # samples of a group differ


def test_samples_do_not_depend_on_batching_or_prompt_order(engine, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=3)
    params = SamplingParams(group_size=3, max_new_tokens=6, seed=7)
    whole = engine.generate(prompts, params)
    engine.max_batch_size = 2
    try:
        rounds = engine.generate(prompts[::-1], params)
    finally:
        engine.max_batch_size = 64
    texts = rounds.completion_texts
    assert whole.completion_texts == texts[6:] + texts[3:6] + texts[:3]


def test_stop_strings_end_rows_with_reason_stop(engine, tiny_model_dir):
    prompts = prompts_for(tiny_model_dir, count=2)
    free = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=12, seed=8))
    stop = free.completion_texts[0][3]  # a character the first row samples at its 4th step
    cut = engine.generate(prompts, SamplingParams(group_size=4, max_new_tokens=12, seed=8, stop=(stop,)))
    assert cut.finish_reasons[0] == "stop" and cut.completion_texts[0].endswith(stop)
    for text, reason in zip(cut.completion_texts, cut.finish_reasons):
        assert (stop in text) == (reason == "stop") and text.count(stop) <= 1
    assert bool((cut.completion_lengths <= free.completion_lengths).all())


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


def test_push_lora_equals_peft_merge_and_does_not_stack(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    engine = build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)
    ids = torch.tensor([[3, 50, 70, 90, 110]])
    base_logits = engine.model(input_ids=ids).logits
    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(tmp_path)
    expected = peft.merge_and_unload()(input_ids=ids).logits
    engine.push_lora(str(tmp_path), version=1)
    engine.push_lora(str(tmp_path), version=2)  # merged from the kept base: applying twice must not stack
    got = engine.model(input_ids=ids).logits
    assert engine.policy_version == 2 and not torch.allclose(got, base_logits, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_too_long_prompt_is_a_clear_error(engine):
    prompt = Prompt("long", "x", tuple(range(10)) * 100, {})
    with pytest.raises(UserError, match="max_prompt_tokens"):
        engine.generate([prompt], SamplingParams(max_new_tokens=4))
