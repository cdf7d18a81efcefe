"""`build_batch`, per-request seeds and LoRA merging: the backend-independent parts, no model needed."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rl.errors import UserError
from rl.types import Prompt, SamplingParams
from rollout.engine import Sample, build_batch, check_prompts, merge_lora, request_seeds


class _Bytes:
    def batch_decode(self, rows, skip_special_tokens):
        assert skip_special_tokens
        return ["".join(chr(97 + t) for t in row) for row in rows]


def test_build_batch_is_right_padded_with_aligned_logprobs():
    p, q = Prompt("p", "P", (5, 6), {"answer": "1"}), Prompt("q", "Q", (7,), {"answer": "2"})
    samples = [Sample(p, 0, (1, 2), (-0.5, -0.25), "stop"), Sample(q, 1, (3, 4, 0), (-1.0, -2.0, -3.0), "length")]
    batch = build_batch(samples, _Bytes(), pad_token_id=9, policy_version=3)
    assert batch.input_ids.tolist() == [[5, 6, 1, 2], [7, 3, 4, 0]]
    assert batch.loss_mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    assert batch.sampling_logprobs.tolist() == [[0, 0, -0.5, -0.25], [0, -1.0, -2.0, -3.0]]
    assert batch.completion_texts == ("bc", "dea") and batch.policy_version == 3
    assert batch.prompt_lengths.tolist() == [2, 1] and batch.sample_meta[1]["answer"] == "2"
    short = build_batch(samples[:1], _Bytes(), 9, 0)
    assert short.seq_len == 4 and short.attention_mask.all()


def test_request_seeds_follow_prompt_ids_not_positions():
    a, b = Prompt("a", "", (1,)), Prompt("b", "", (1,))
    assert request_seeds([a, b], 0) == request_seeds([b, a], 0)[::-1]
    assert request_seeds([a, b], 0) != request_seeds([a, b], 1)
    twice = request_seeds([a, a], 0)
    assert twice[0] != twice[1]  # a repeated prompt gets fresh samples


def test_too_long_and_empty_prompts_are_user_errors():
    with pytest.raises(UserError, match="max_prompt_tokens=4"):
        check_prompts([Prompt("x", "", tuple(range(5)))], SamplingParams(max_new_tokens=1), 4, 100)
    with pytest.raises(UserError, match="context of 8"):
        check_prompts([Prompt("x", "", (1, 2))], SamplingParams(max_new_tokens=7), 4, 8)
    with pytest.raises(UserError, match="empty"):
        check_prompts([Prompt("x", "", ())], SamplingParams(), 4, 8)


def test_merge_lora_matches_w_plus_scaled_ba(tmp_path):
    torch.manual_seed(0)
    base = {"layer.q_proj.weight": torch.randn(6, 4), "layer.k_proj.weight": torch.randn(6, 4)}
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    save_file({"base_model.model.layer.q_proj.lora_A.weight": a, "base_model.model.layer.q_proj.lora_B.weight": b},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8}))
    merged = merge_lora(base, str(tmp_path))
    assert set(merged) == {"layer.q_proj.weight"}
    torch.testing.assert_close(merged["layer.q_proj.weight"], base["layer.q_proj.weight"] + 4.0 * b @ a)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        merge_lora(base, str(tmp_path))
