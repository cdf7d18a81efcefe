"""`agent.max_total_tokens` with OpenAI-client agents (rollout/endpoint_rollout.py): an episode whose tokens after
the prompt pass the budget has its row cut there, exactly as served, and ends with finish `length`, truncation
`token_budget`; an episode within it is untouched."""

from __future__ import annotations

import openai
import pytest
import torch
from common import prompts_for

from rl.config import load_job
from rl.models import load_tokenizer
from rl.types import SamplingParams
from rollout.endpoint_rollout import EndpointRollout
from rollout.engine import build_engine


def three_turns(client: openai.OpenAI, question: str, fields: dict) -> None:
    messages = [{"role": "user", "content": question}]
    for t in range(3):
        reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                     {"role": "user", "content": f"go on {t}"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)


def _batch(engine, tiny_model_dir, budget: int | None):
    rollout = EndpointRollout(engine, load_tokenizer(tiny_model_dir), three_turns, concurrency=2,
                              max_total_tokens=budget)
    try:
        return rollout.generate(prompts_for(tiny_model_dir, count=1), SamplingParams(group_size=2, max_new_tokens=6,
                                                                                     seed=7))
    finally:
        rollout.close()


def test_an_openai_agent_episode_past_its_token_budget_ends_with_length(engine, tiny_model_dir):
    whole, cut = _batch(engine, tiny_model_dir, None), _batch(engine, tiny_model_dir, 10)
    for i in range(2):
        p = int(whole.prompt_lengths[i])
        n = int(whole.attention_mask[i].sum()) - p
        assert n > 10 and whole.sample_meta[i]["truncation"] == ""  # 3 turns and 2 user messages: past 10
        assert int(cut.attention_mask[i].sum()) - p == 10  # the budget's first tokens ...
        assert cut.input_ids[i, : p + 10].tolist() == whole.input_ids[i, : p + 10].tolist()  # ... as served
        assert cut.loss_mask[i, : p + 10].tolist() == whole.loss_mask[i, : p + 10].tolist()
        # (the same tokens; their logprobs to float rounding: the engine batches the two episodes' turns as they come)
        assert torch.allclose(cut.sampling_logprobs[i, : p + 10], whole.sampling_logprobs[i, : p + 10], atol=1e-5)
        assert cut.finish_reasons[i] == "length" and cut.sample_meta[i]["truncation"] == "token_budget"
    roomy = _batch(engine, tiny_model_dir, 10_000)  # a budget it stays within changes nothing
    assert roomy.input_ids.tolist() == whole.input_ids.tolist() and roomy.finish_reasons == whole.finish_reasons
    assert all(m["truncation"] == "" for m in roomy.sample_meta)
