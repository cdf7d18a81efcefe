"""PCL (arXiv 2510.01135): selection, value targets, on-policy value updates, pool sampling, resume state."""

import json

import pytest
import torch

from envs.curriculum import PCLValueModel, group_mean_rewards, select_closest
from rl.batch import RolloutBatch
from rl.config import load_job
from rl.loop.checkpoint import load_checkpoint, save_checkpoint, weights_writer
from rl.loop.runtime import build_env
from rl.loop.sampler import CurriculumSampler, PromptSampler, build_sampler
from rl.loop.steps import varied_group_share
from rl.models import load_tokenizer


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    job = load_job("tiny", ['env={name: arithmetic, digits: [1, 2, 3], operations: ["+", "*"], train_size: 60}'])
    return list(build_env(job, load_tokenizer(tiny_model_dir)).train_prompts())


def pcl_job(*overrides):
    return load_job("tiny", ["curriculum={name: pcl, pool_factor: 3}", *overrides])


@pytest.fixture
def value_model(tiny_model_dir):
    job = pcl_job("curriculum.updates_per_step=1", "curriculum.lr=0.01")
    return PCLValueModel(job.curriculum, tiny_model_dir, "float32", seed=0)


def scored_batch(prompts, rewards):
    """One group per prompt, one 1-token completion per sample; rewards[g] are group g's sample rewards."""
    rows = [(p, r) for p, rs in zip(prompts, rewards) for r in rs]
    width = max(len(p.token_ids) for p, _ in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.bool)
    loss = torch.zeros_like(attn)
    for i, (p, _) in enumerate(rows):
        n = len(p.token_ids)
        ids[i, :n] = torch.tensor(p.token_ids)
        ids[i, n] = 7
        attn[i, : n + 1] = True
        loss[i, n] = True
    groups = [g for g, rs in enumerate(rewards) for _ in rs]
    batch = RolloutBatch(
        input_ids=ids, attention_mask=attn, loss_mask=loss, sampling_logprobs=torch.zeros(len(rows), width),
        prompt_lengths=torch.tensor([len(p.token_ids) for p, _ in rows]), group_ids=torch.tensor(groups),
        policy_version=0, finish_reasons=["stop"] * len(rows), prompt_texts=[p.text for p, _ in rows],
        completion_texts=["x"] * len(rows), sample_meta=[p.meta for p, _ in rows]).validate()
    return batch.with_rewards(torch.tensor([r for _, r in rows], dtype=torch.float32), {})


def test_selection_keeps_the_predictions_closest_to_the_target_with_stable_ties():
    assert select_closest(torch.tensor([0.1, 0.45, 0.9, 0.55, 0.5]), 0.5, 2) == [4, 1]
    assert select_closest(torch.tensor([0.25, 0.75, 0.0, 0.25]), 0.5, 3) == [0, 1, 3]  # exact ties: pool order
    assert select_closest(torch.tensor([0.9, 0.2, 0.35]), 0.3, 5) == [2, 1, 0]  # never drops below the pool


def test_value_targets_are_mean_group_rewards_keyed_by_prompt_tokens(prompts):
    batch = scored_batch(prompts[:2], [[1, 0, 1, 1], [0, 0, 0, 0]])
    keys, targets = group_mean_rewards(batch)
    assert keys == [tuple(prompts[0].token_ids), tuple(prompts[1].token_ids)]
    assert targets.tolist() == [0.75, 0.0]
    assert varied_group_share(batch) == 0.5


def test_value_updates_reduce_the_error_and_steer_selection(value_model, prompts):
    easy, mid, hard = prompts[0:4], prompts[4:8], prompts[8:12]
    batch = scored_batch(easy + mid + hard, [[1, 1, 1, 1]] * 4 + [[1, 0, 1, 0]] * 4 + [[0, 0, 0, 0]] * 4)
    errors = [value_model.update(batch)["curriculum/value_mse"] for _ in range(60)]
    assert errors[-1] < 0.1 * errors[0]
    assert all(b <= a + 1e-6 for a, b in zip(errors[::10], errors[10::10]))  # falls steadily, not by chance
    pool = hard[:2] + easy[:2] + mid[:2]
    chosen, metrics = value_model.select(pool, 2)
    assert chosen == mid[:2]
    assert abs(metrics["curriculum/selected_pred_mean"] - 0.5) < 0.15 and metrics["curriculum/pool_size"] == 6
    assert metrics["curriculum/select_seconds"] >= 0


def test_value_model_update_uses_the_scored_rewards_it_is_given(value_model, prompts):
    """MSE gradient sign: a prompt whose group succeeded moves up, one whose group failed moves down."""
    before = value_model.predict([tuple(prompts[0].token_ids), tuple(prompts[1].token_ids)])
    value_model.update(scored_batch(prompts[:2], [[1, 1, 1, 1], [0, 0, 0, 0]]))
    after = value_model.predict([tuple(prompts[0].token_ids), tuple(prompts[1].token_ids)])
    assert after[0] > before[0] and after[1] < before[1]


def test_pool_sampling_draws_pool_factor_times_the_batch_from_the_uniform_order(value_model, prompts):
    sampler = CurriculumSampler(PromptSampler(prompts, seed=3), value_model, pool_factor=3)
    twin = PromptSampler(prompts, seed=3)
    for _ in range(4):
        chosen = sampler.next(5)
        pool = twin.next(15)
        assert len(chosen) == 5 and len({p.prompt_id for p in chosen}) == 5
        assert {p.prompt_id for p in chosen} <= {p.prompt_id for p in pool}
        assert sampler.state_dict() == twin.state_dict()  # the epoch cursor counts every candidate
        assert sampler.last_metrics()["curriculum/pool_size"] == 15


def test_null_curriculum_samples_uniformly_as_before(tiny_model_dir, prompts):
    sampler = build_sampler(load_job("tiny", ["curriculum=null"]), prompts, tiny_model_dir)
    reference = PromptSampler(prompts, seed=0)
    assert type(sampler) is PromptSampler and sampler.last_metrics() == {}
    assert [p.prompt_id for p in sampler.next(50)] == [p.prompt_id for p in reference.next(50)]
    assert isinstance(build_sampler(pcl_job(), prompts, tiny_model_dir), CurriculumSampler)


def test_value_model_state_round_trips_through_a_checkpoint(tiny_model_dir, value_model, prompts, tmp_path):
    batch = scored_batch(prompts[:6], [[1, 0, 0, 0], [1, 1, 0, 1], [0] * 4, [1] * 4, [1, 0, 1, 0], [0, 0, 0, 1]])
    for _ in range(3):
        value_model.update(batch)
    path = save_checkpoint(tmp_path, 3, policy=weights_writer({"w": torch.zeros(1)}, {}), state={"step": 3},
                           config_yaml="", curriculum_state=value_model.state_dict())
    restored = PCLValueModel(value_model.cfg, tiny_model_dir, "float32", seed=1)  # a different init, overwritten
    restored.load_state_dict(load_checkpoint(path)["curriculum"])
    keys = [tuple(p.token_ids) for p in prompts[:20]]
    assert torch.equal(restored.predict(keys), value_model.predict(keys))
    nxt = scored_batch(prompts[6:9], [[1, 1, 0, 0]] * 3)
    a, b = value_model.update(nxt), restored.update(nxt)  # Adam moments and step counts were restored too
    assert a["curriculum/value_mse"] == b["curriculum/value_mse"]
    assert torch.equal(restored.predict(keys), value_model.predict(keys))
    assert load_checkpoint(save_checkpoint(tmp_path, 4, policy=weights_writer({"w": torch.zeros(1)}, {}),
                                           state={}, config_yaml=""))["curriculum"] is None


def test_pcl_config_is_validated_by_key():
    from rl.errors import UserError

    with pytest.raises(UserError, match="curriculum"):
        load_job("tiny", ["curriculum={name: pcl, pool_factor: 0}"])
    with pytest.raises(UserError, match="curriculum"):
        load_job("tiny", ["curriculum={name: pcl, bogus: 1}"])
    assert load_job("tiny", ["curriculum={name: pcl}"]).curriculum.target == 0.5
    assert json.loads(json.dumps(load_job("tiny").model_dump()))["curriculum"] is None


def test_mixed_digits_give_equal_shares_of_each_difficulty(prompts):
    lengths = {}
    for p in prompts:
        a = p.meta["question"].split()[2]
        lengths[len(a)] = lengths.get(len(a), 0) + 1
    assert lengths == {1: 20, 2: 20, 3: 20}
