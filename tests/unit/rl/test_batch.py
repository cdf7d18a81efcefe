import dataclasses

import pytest
import torch

from rl.batch import RolloutBatch


def make_batch(lengths=((3, 2), (3, 4), (2, 1), (2, 3)), groups=(0, 0, 1, 1), version=0) -> RolloutBatch:
    """Rows of (prompt_len, completion_len); token ids encode (row, position) so rows are traceable."""
    width = max(p + c for p, c in lengths)
    n = len(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.bool)
    loss = torch.zeros(n, width, dtype=torch.bool)
    lp = torch.zeros(n, width)
    for i, (p, c) in enumerate(lengths):
        ids[i, : p + c] = torch.arange(p + c) + 100 * (i + 1)
        attn[i, : p + c] = True
        loss[i, p : p + c] = True
        lp[i, p : p + c] = -0.5 * (i + 1)
    return RolloutBatch(
        input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=lp,
        prompt_lengths=torch.tensor([p for p, _ in lengths]), group_ids=torch.tensor(groups),
        policy_version=version, finish_reasons=["stop"] * n, prompt_texts=[f"p{g}" for g in groups],
        completion_texts=[f"c{i}" for i in range(n)], sample_meta=[{"answer": str(g)} for g in groups],
    )


def test_valid_batch_passes_and_reports_shapes():
    b = make_batch().validate()
    assert b.num_samples == 4 and b.seq_len == 7 and b.num_groups == 2
    assert b.completion_lengths.tolist() == [2, 4, 1, 3]
    assert b.group_bounds() == [(0, 2), (2, 4)]


@pytest.mark.parametrize("breakage, message", [
    (lambda b: b.replace(loss_mask=b.loss_mask | (torch.arange(7) == 0)), "prompt tokens"),
    (lambda b: b.replace(group_ids=torch.tensor([0, 1, 0, 1])), "contiguous"),
    (lambda b: b.replace(finish_reasons=["stop", "eos", "stop", "stop"]), "finish_reasons"),
    (lambda b: b.replace(attention_mask=b.attention_mask & (torch.arange(7) != 0)), "right-padded"),
    (lambda b: b.replace(prompt_texts=["a"]), "prompt_texts"),
    (lambda b: b.with_rewards(torch.zeros(3)), "rewards"),
])
def test_validate_names_the_broken_invariant(breakage, message):
    with pytest.raises(ValueError, match=message):
        breakage(make_batch()).validate()


def test_batch_is_frozen_and_with_returns_new():
    b = make_batch()
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.rewards = torch.zeros(4)  # type: ignore[misc]
    scored = b.with_rewards(torch.ones(4), {"acc": torch.ones(4)})
    assert b.rewards is None and scored.rewards.tolist() == [1, 1, 1, 1]
    with pytest.raises(TypeError):
        scored.sample_meta[0]["answer"] = "x"  # type: ignore[index]


def test_split_by_groups_never_splits_a_group_and_concat_roundtrips():
    b = make_batch(lengths=((3, 2), (3, 4), (2, 1), (2, 3), (1, 1), (1, 2)), groups=(0, 0, 1, 1, 2, 2))
    b = b.with_rewards(torch.arange(6.0), {"acc": torch.arange(6.0) * 2}).with_advantages(torch.arange(6.0))
    shards = b.split_by_groups(2)
    assert [s.num_samples for s in shards] == [4, 2]
    assert shards[1].seq_len == 3  # trimmed to its own longest row
    for s in shards:
        s.validate()
        assert all(len(set(s.prompt_texts[a:e])) == 1 for a, e in s.group_bounds())
    back = RolloutBatch.concat(shards).validate()
    for name in ("input_ids", "attention_mask", "loss_mask", "sampling_logprobs", "rewards", "advantages"):
        assert torch.equal(getattr(back, name), getattr(b, name)), name
    assert torch.equal(back.reward_components["acc"], b.reward_components["acc"])
    assert back.completion_texts == b.completion_texts and back.num_groups == 3


def test_split_into_more_shards_than_groups_gives_one_group_each():
    assert [s.num_samples for s in make_batch().split_by_groups(5)] == [2, 2]


def test_concat_keeps_groups_distinct_and_oldest_version():
    a, b = make_batch(version=3), make_batch(version=2)
    c = RolloutBatch.concat([a, b]).validate()
    assert c.num_groups == 4 and c.policy_version == 2
