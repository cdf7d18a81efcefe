"""Multi-turn episodes: model tokens trained on, tool observations masked out, token-in/token-out."""

import pytest
import torch

from envs.base import render_prompt
from envs.multiturn import CalculatorEnv, calculate, run_episode


def scripted(tokenizer, turns):
    """A generate_fn replaying `turns` (text per call), checking it sees every earlier token unchanged."""
    seen = []

    def generate(token_ids, max_new_tokens):
        seen.append(list(token_ids))
        ids = tokenizer(turns[len(seen) - 1], add_special_tokens=False)["input_ids"][:max_new_tokens]
        return ids, [-0.5] * len(ids)

    return generate, seen


def test_calculator_episode_masks_observations(tiny_tokenizer):
    prompt = render_prompt(tiny_tokenizer, "What is 12 * 7 + 1?", None, "p0", {"answer": "85"})
    generate, seen = scripted(tiny_tokenizer, ["<calc>12*7</calc>", "So 84 + 1 = 85."])
    episode = run_episode(CalculatorEnv(tiny_tokenizer), prompt, generate, max_new_tokens=32, max_turns=4)
    assert episode.turns == 2 and episode.finish_reason == "stop"
    text = tiny_tokenizer.decode(list(episode.completion_ids))
    assert text == "<calc>12*7</calc><result>84</result>So 84 + 1 = 85."
    n_call, n_obs = len("<calc>12*7</calc>"), len("<result>84</result>")  # byte-level tokenizer: 1 token/char
    assert episode.loss_mask == (True,) * n_call + (False,) * n_obs + (True,) * len("So 84 + 1 = 85.")
    assert all(lp == 0.0 for lp, m in zip(episode.logprobs, episode.loss_mask) if not m)
    # token-in/token-out: the second call got the prompt, the call and the observation as exact tokens
    assert seen[1] == list(prompt.token_ids) + list(episode.completion_ids[: n_call + n_obs])


def test_budgets_end_the_episode(tiny_tokenizer):
    prompt = render_prompt(tiny_tokenizer, "loop", None, "p1", {})
    generate, _ = scripted(tiny_tokenizer, ["<calc>1+1</calc>"] * 10)
    episode = run_episode(CalculatorEnv(tiny_tokenizer), prompt, generate, max_new_tokens=32, max_turns=3)
    assert episode.turns == 3 and episode.finish_reason == "length"
    short = run_episode(CalculatorEnv(tiny_tokenizer), prompt, generate, max_new_tokens=32, max_turns=9,
                        max_total_tokens=20)
    assert len(short.completion_ids) == 20 and len(short.loss_mask) == len(short.logprobs) == 20


def test_calculator_is_safe():
    assert calculate("2 * (3 + 4) - 1 / 2") == 13.5 and calculate("-2 ** 3") == -8
    for bad in ("__import__('os')", "9 ** 9 ** 9", "1 / 0", "x + 1", "(1"):
        with pytest.raises(ValueError):
            calculate(bad)


def test_episode_with_the_tiny_model(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def generate(token_ids, max_new_tokens):
        ids = torch.tensor([token_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tiny_tokenizer.pad_token_id or 0)
        new = out.sequences[0, ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
        return new, logprobs

    prompt = render_prompt(tiny_tokenizer, "What is 2 + 2?", None, "p2", {})
    episode = run_episode(CalculatorEnv(tiny_tokenizer), prompt, generate, max_new_tokens=8, max_turns=2)
    assert 1 <= episode.turns <= 2 and 0 < len(episode.completion_ids) <= 16 + 64
    assert len(episode.loss_mask) == len(episode.logprobs) == len(episode.completion_ids)
    assert all(lp <= 0.0 for lp in episode.logprobs)
