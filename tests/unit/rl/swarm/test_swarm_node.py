"""A node's exchange on the real tiny model: I local + J external groups, re-tokenisation, re-scoring
with the node's own rewards, the learner's logprobs for external rows, rejection of bad peer data."""

import json
import time

import pytest
import torch

from rl.config import load_job
from rl.loop import steps
from rl.loop.runtime import build_run
from rl.swarm.exchange import SharedRollout
from rl.swarm.node import SwarmNode
from rl.swarm.transports import MemoryTransport, reset_memory_board

QUESTION = "What is 3 + 4? Answer with just the number."


def job_for(board: str, **swarm):
    spec = {"local": 2, "external": 2, "transport": {"name": "memory", "board": board}, **swarm}
    return load_job("tiny", [f"swarm={json.dumps(spec)}", "rewards=[{name: math_answer}]",
                             "rollout.prompts_per_step=3", "logging.wandb.mode=disabled"])


@pytest.fixture(scope="module")
def parts():
    p = build_run(job_for("unused"))
    yield p
    p.close()


def local_batch(parts, step=1):
    prompts = parts.sampler.next(parts.job.rollout.prompts_per_step)
    batch = parts.rollout.generate(prompts, steps.sampling_params(parts.job, step))
    return steps.score(parts, batch)[0]


def peer_rollout(i, completions=("7", "12"), claimed=(0.0, 1.0), reasons=("stop", "stop"), node="peer"):
    return SharedRollout(node_id=node, rollout_id=f"{node}-1-{i}", round=1, question=QUESTION,
                         completions=completions, finish_reasons=reasons, rewards=claimed, meta={"answer": "7"})


def node_with_peers(parts, board, rollouts, **swarm):
    reset_memory_board(board)
    node = SwarmNode(job_for(board, **swarm))
    peer = MemoryTransport(job_for(board).swarm.transport)
    peer.publish([r.encode() for r in rollouts])
    return node


@pytest.mark.parametrize("available, expected_external", [(3, 2), (1, 1), (0, 0)])
def test_a_step_trains_on_I_local_and_up_to_J_external_groups(  # noqa: N802 - I, J: the SAPO paper's symbols
        parts, available, expected_external):
    node = node_with_peers(parts, f"count{available}", [peer_rollout(i) for i in range(available)])
    local = local_batch(parts)
    mixed, m = node.exchange(parts, local, step=1)
    assert m["swarm/local"] == 2 and m["swarm/external"] == expected_external
    assert m["swarm/external_shortfall"] == 2 - expected_external
    assert mixed.num_groups == 2 + expected_external
    assert mixed.num_samples == 2 * parts.job.rollout.group_size + 2 * expected_external
    assert m["swarm/published"] == 3  # every generated group is shared, not only the I trained on
    g = parts.job.rollout.group_size
    assert mixed.completion_texts[: 2 * g] == local.completion_texts[: 2 * g]  # the first I local groups


def test_external_rows_are_retokenised_and_rescored_by_the_receiver(parts):
    node = node_with_peers(parts, "rescore", [peer_rollout(0)])
    mixed, m = node.exchange(parts, local_batch(parts), step=1)
    ext = mixed.select(range(mixed.num_samples - 2, mixed.num_samples))
    tok = parts.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True) if tok.chat_template else QUESTION + "\n"
    assert ext.prompt_texts[0] == prompt  # the receiver's own template
    first = ext.input_ids[0][ext.loss_mask[0]].tolist()
    assert first == tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ext.rewards.tolist() == [1.0, 0.0]  # the sender claimed [0, 1]: ignored
    assert m["swarm/claimed_reward_gap"] == 1.0 and m["swarm/external_reward_mean"] == 0.5


def test_external_rows_carry_the_learners_logprobs_so_the_ratio_is_one(parts):
    node = node_with_peers(parts, "logprobs", [peer_rollout(0, completions=("7 is it", "maybe 12"))])
    mixed, _ = node.exchange(parts, local_batch(parts), step=1)
    ext = mixed.select(range(mixed.num_samples - 2, mixed.num_samples))
    learner = parts.learner.logprobs(ext)
    assert torch.allclose(ext.sampling_logprobs[ext.loss_mask], learner[ext.loss_mask], atol=1e-5)
    assert bool((ext.sampling_logprobs[ext.loss_mask] < 0).all())
    metrics = steps.train(parts, steps.advantages(parts.job, mixed)[0])
    assert metrics["policy/mismatch_kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_a_long_external_completion_is_cut_to_max_new_tokens(parts):
    node = node_with_peers(parts, "long", [peer_rollout(0, completions=("1" * 50, "7"))])
    mixed, _ = node.exchange(parts, local_batch(parts), step=1)
    ext = mixed.select(range(mixed.num_samples - 2, mixed.num_samples))
    assert ext.completion_lengths.tolist() == [parts.job.rollout.max_new_tokens, 2]
    assert ext.finish_reasons == ("length", "stop")


def test_bad_peer_data_is_rejected_and_counted_and_good_data_still_used(parts):
    node = node_with_peers(parts, "bad", [peer_rollout(0)])
    garbage = [b"{not json", json.dumps({"format": "rlpost-sapo/1"}).encode(),
               peer_rollout(1).encode().replace(b'"rewards":[0.0,1.0]', b'"rewards":[NaN,1.0]'),
               b"x" * (node.cfg.max_message_bytes + 1), peer_rollout(0).encode()]  # the last: a duplicate
    MemoryTransport(node.cfg.transport).publish(garbage)
    _, m = node.exchange(parts, local_batch(parts), step=1)
    assert m["swarm/external"] == 1 and m["swarm/rejected"] == 5
    assert {k: m[k] for k in m if k.startswith("swarm/rejected/")} == {
        "swarm/rejected/malformed": 1, "swarm/rejected/schema": 1, "swarm/rejected/nonfinite": 1,
        "swarm/rejected/oversized": 1, "swarm/rejected/duplicate": 1}


def test_own_messages_are_not_used_as_external(parts):
    node = node_with_peers(parts, "own", [])
    local = local_batch(parts)
    _, m = node.exchange(parts, local, step=1)  # publishes 3 groups onto the board it reads
    assert m["swarm/published"] == 3 and m["swarm/external"] == 0 and m["swarm/rejected"] == 0


def test_skip_uniform_reward_drops_zero_advantage_external_groups(parts):
    rollouts = [peer_rollout(0, completions=("12", "13"), claimed=(1.0, 1.0)), peer_rollout(1)]
    node = node_with_peers(parts, "uniform", rollouts, skip_uniform_reward=True)
    _, m = node.exchange(parts, local_batch(parts), step=1)
    assert m["swarm/external"] == 1 and m["swarm/skipped_uniform"] == 1


def test_an_external_only_node_trains_on_peers(parts):
    node = node_with_peers(parts, "consumer", [peer_rollout(0), peer_rollout(1)], local=0, share=False)
    mixed, m = node.exchange(parts, local_batch(parts), step=1)
    assert m["swarm/local"] == 0 and m["swarm/external"] == 2 and m["swarm/published"] == 0
    assert mixed.num_samples == 4


def test_an_external_only_node_without_peers_falls_back_to_one_own_group(parts):
    node = node_with_peers(parts, "lonely", [], local=0)
    mixed, m = node.exchange(parts, local_batch(parts), step=1)
    assert m["swarm/fallback_local"] == 1 and m["swarm/local"] == 1 and mixed.num_groups == 1


def test_a_step_whose_groups_were_all_dropped_stays_an_empty_step(parts):
    """on_error: drop_group can leave no rows; with no peers the node passes the empty batch on (train skips it)."""
    node = node_with_peers(parts, "empty", [], local=0)
    scored = local_batch(parts)
    empty = scored.select(torch.tensor([], dtype=torch.long))
    mixed, m = node.exchange(parts, empty, step=1)
    assert mixed.num_samples == 0 and m["swarm/local"] == 0 and m["swarm/external"] == 0
    assert steps.train(parts, steps.advantages(parts.job, mixed)[0]) == {"train/skipped_empty": 1.0}


def test_a_node_alone_with_a_dead_http_hub_keeps_training_without_waiting(parts):
    job = load_job("tiny", ['swarm={local: 2, external: 2, wait_s: 0.3, transport: {name: http, '
                            'url: "http://127.0.0.1:9", timeout_s: 0.2}}', "rewards=[{name: math_answer}]",
                            "rollout.prompts_per_step=3"])
    node = SwarmNode(job)
    local = local_batch(parts)
    start = time.perf_counter()
    mixed, m = node.exchange(parts, local, step=1)
    assert time.perf_counter() - start < 5  # wait_s 0.3 + a refused connection per poll
    assert m["swarm/local"] == 2 and m["swarm/external"] == 0 and m["swarm/transport_errors"] >= 1
    assert mixed.num_groups == 2
    node.close()
