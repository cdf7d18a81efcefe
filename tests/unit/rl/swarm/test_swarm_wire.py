"""The wire format, strict validation of peer messages, and the external pool (no model needed)."""

import json
import random

import pytest
import torch

from rl.batch import RolloutBatch
from rl.swarm.exchange import SharedRollout, rollouts_from_batch
from rl.swarm.pool import ExternalPool
from rl.swarm.validation import Limits, Rejected, parse_message


def rollout(**changes) -> SharedRollout:
    base = dict(node_id="peer", rollout_id="peer-1-0", round=1, question="What is 3 + 4? Answer with just the number.",
                completions=["7", "8"], finish_reasons=["stop", "length"], rewards=[1.0, 0.0],
                meta={"answer": "7", "numbers": [1, 2]}, model="m", sent_at=123.0)
    return SharedRollout(**{**base, **changes})


def message(**changes) -> bytes:
    obj = {**rollout().to_dict(), **changes}
    return json.dumps(obj).encode()


def scored_batch(meta=({"question": "q0", "answer": "1"}, {"question": "q1", "answer": "2"})) -> RolloutBatch:
    n = 2 * len(meta)
    ids = torch.arange(n * 4).reshape(n, 4)
    loss = torch.tensor([[False, False, True, True]] * n)
    return RolloutBatch(
        input_ids=ids, attention_mask=torch.ones(n, 4, dtype=torch.bool), loss_mask=loss,
        sampling_logprobs=torch.zeros(n, 4), prompt_lengths=torch.full((n,), 2), group_ids=torch.arange(n) // 2,
        policy_version=3, finish_reasons=["stop", "length"] * len(meta), prompt_texts=["p"] * n,
        completion_texts=[f"c{i}" for i in range(n)], sample_meta=[m for m in meta for _ in range(2)],
    ).validate().with_rewards(torch.arange(n, dtype=torch.float32))


def test_a_scored_batch_becomes_one_message_per_group_and_round_trips():
    rollouts, unshareable = rollouts_from_batch(scored_batch(), "node0", 5, "tiny")
    assert unshareable == 0 and len(rollouts) == 2
    assert rollouts[1].question == "q1" and rollouts[1].completions == ("c2", "c3")
    assert rollouts[1].rewards == (2.0, 3.0) and dict(rollouts[1].meta) == {"answer": "2"}
    assert rollouts[0].rollout_id != rollouts[1].rollout_id
    for r in rollouts:
        assert parse_message(r.encode(), Limits()) == r


def test_groups_without_a_user_message_are_not_shared():
    rollouts, unshareable = rollouts_from_batch(scored_batch(({"answer": "1"}, {"question": "q", "answer": "2"})),
                                                "node0", 1)
    assert unshareable == 1 and [r.question for r in rollouts] == ["q"]


LIMITS = Limits(max_message_bytes=2000, max_completions=4, max_text_chars=100)


@pytest.mark.parametrize("data, reason", [
    (b"not json", "malformed"),
    (b"\xff\xfe", "malformed"),
    (b"[1, 2]", "schema"),
    (b"x" * 2001, "oversized"),
    (message().replace(b'"rewards": [1.0, 0.0]', b'"rewards": [NaN, 0.0]'), "nonfinite"),
    (message().replace(b'"rewards": [1.0, 0.0]', b'"rewards": [1e999, 0.0]'), "nonfinite"),
    (message().replace(b'"sent_at": 123.0', b'"sent_at": Infinity'), "nonfinite"),
    (message(extra=1), "schema"),
    (json.dumps({k: v for k, v in rollout().to_dict().items() if k != "meta"}).encode(), "schema"),
    (message(rewards=[1.0]), "schema"),
    (message(completions=[], finish_reasons=[], rewards=[]), "schema"),
    (message(completions=["a"] * 5, finish_reasons=["stop"] * 5, rewards=[0] * 5), "schema"),
    (message(round=True), "schema"),
    (message(round=-1), "schema"),
    (message(rewards=["1", 0]), "schema"),
    (message(completions=["7", 8]), "schema"),
    (message(finish_reasons=["stop", "eos"]), "schema"),
    (message(node_id="../../etc"), "schema"),
    (message(format="other/2"), "schema"),
    (message(question="  "), "schema"),
    (message(completions=["7", "x" * 101]), "too_long"),
    (message(meta={"answer": {"nested": 1}}), "schema"),
    (message(meta={"question": "override"}), "schema"),
    (message(meta={"answer": "y" * 101}), "too_long"),
])
def test_bad_peer_messages_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected) as info:
        parse_message(data, LIMITS)
    assert info.value.reason == reason


def test_a_valid_message_passes_the_same_limits():
    assert parse_message(message(), LIMITS) == rollout()


def test_pool_rejects_duplicates_even_after_use():
    pool = ExternalPool(size=10, max_age_s=60)
    pool.add(rollout())
    with pytest.raises(Rejected) as info:
        pool.add(rollout())
    assert info.value.reason == "duplicate"
    assert len(pool.take(5, random.Random(0))) == 1
    with pytest.raises(Rejected):
        pool.add(rollout())  # a replay of a used rollout is still a duplicate


def test_pool_expires_old_rollouts_and_keeps_its_size():
    now = [0.0]
    pool = ExternalPool(size=3, max_age_s=10, clock=lambda: now[0])
    for i in range(5):
        pool.add(rollout(rollout_id=f"r{i}"))
    assert len(pool) == 3 and pool.dropped == 2
    now[0] = 11.0
    pool.add(rollout(rollout_id="new"))
    assert [r.rollout_id for r in pool.take(10, random.Random(0))] == ["new"]


def test_pool_draws_fresh_rollouts_first_then_the_newest_older_ones():
    pool = ExternalPool(size=100, max_age_s=60)
    for i in range(4):
        pool.add(rollout(rollout_id=f"old{i}"))
    pool.take(1, random.Random(0))  # marks the old ones as offered
    for i in range(3):
        pool.add(rollout(rollout_id=f"new{i}"))
    got = [r.rollout_id for r in pool.take(2, random.Random(1))]
    assert len(got) == 2 and all(g.startswith("new") for g in got)
    got = [r.rollout_id for r in pool.take(3, random.Random(1))]
    assert got[0].startswith("new") and len(got) == 3 and got[1:] == sorted(got[1:], reverse=True)
