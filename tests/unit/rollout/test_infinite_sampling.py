"""Infinite Sampling (arXiv 2506.22950) on the HF backend: same RolloutBatch as the plain engine, bounded
concurrency, slot refill, and the length-aware planner. Tiny model, seconds."""

import itertools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pytest
import torch
from common import mean_abs_logprob_diff, prompts_for

from rl.config import load_job
from rl.errors import UserError
from rl.types import SamplingParams
from rollout.engine import build_engine
from rollout.infinite_sampling import LaneScheduler, LengthPredictor, plan_lanes, slots_for_budget
from rollout.slot_decode import prefill


def _engine(model_dir, *overrides):
    keys = ["rollout.infinite_sampling.enabled=true", *overrides]
    return build_engine(load_job("tiny", keys).rollout, model_dir, "float32", "cpu", seed=0)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return build_engine(load_job("tiny").rollout, tiny_model_dir, "float32", "cpu", seed=0)


@pytest.fixture(scope="module")
def varied(plain, tiny_model_dir):
    """Prompts and sampling params whose completions end at many different lengths (a stop string)."""
    prompts = prompts_for(tiny_model_dir, count=3)
    free = plain.generate(prompts, SamplingParams(group_size=5, max_new_tokens=16, seed=11))
    stop = max(set("".join(free.completion_texts)), key="".join(free.completion_texts).count)  # most common char
    params = SamplingParams(group_size=5, max_new_tokens=16, seed=11, stop=(stop,))
    lengths = plain.generate(prompts, params).completion_lengths.tolist()
    assert len(set(lengths)) >= 4, lengths  # the test needs rows that finish at different steps
    return prompts, params


def _assert_same_batch(a, b):
    b.validate()
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.group_ids, b.group_ids) and a.finish_reasons == b.finish_reasons
    assert a.sample_meta == b.sample_meta and a.completion_texts == b.completion_texts
    torch.testing.assert_close(a.sampling_logprobs, b.sampling_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order,slots", [("sjf", 3), ("fifo", 4), ("sjf", 1)])
def test_same_rollout_batch_as_the_plain_engine(plain, varied, tiny_model_dir, order, slots):
    prompts, params = varied
    engine = _engine(tiny_model_dir, f"rollout.infinite_sampling.order={order}",
                     f"rollout.infinite_sampling.max_concurrent={slots}")
    _assert_same_batch(plain.generate(prompts, params), engine.generate(prompts, params))
    greedy = SamplingParams(group_size=2, max_new_tokens=10, greedy=True)
    _assert_same_batch(plain.generate(prompts, greedy), engine.generate(prompts, greedy))


def test_slots_are_refilled_never_exceed_g_and_beat_fixed_rounds(plain, varied, tiny_model_dir):
    prompts, params = varied
    g = 4
    engine = _engine(tiny_model_dir, f"rollout.infinite_sampling.max_concurrent={g}")
    lengths = engine.generate(prompts, params).completion_lengths.tolist()
    stats = engine.infinite.last_stats
    assert stats.max_concurrent <= g and stats.max_rows <= g and all(c <= g for c in stats.concurrency)
    # every sample after the first g entered a freed slot (except those done on their first token: no slot needed)
    assert stats.refills >= len(lengths) - g - lengths.count(1) > 0
    assert stats.drain_step is not None and stats.drain_step > 0
    assert all(c == g for c in stats.concurrency[:stats.drain_step])  # never a half-empty batch while work waits
    assert stats.prefills == len(prompts)  # each prompt prefilled once, shared by its group
    assert stats.max_width <= max(len(p.token_ids) for p in prompts) + params.max_new_tokens
    naive_steps = sum(max(r) - 1 for r in (lengths[i:i + g] for i in range(0, len(lengths), g)))
    assert stats.decode_steps < naive_steps  # fixed rounds of g wait for each round's longest row


def test_logprobs_match_the_learner(varied, tiny_model_dir):
    prompts, params = varied
    engine = _engine(tiny_model_dir, "rollout.infinite_sampling.max_concurrent=3")
    for temperature in (1.0, 0.7):
        batch = engine.generate(prompts, SamplingParams(group_size=5, max_new_tokens=16, temperature=temperature,
                                                        seed=4, stop=params.stop))
        assert mean_abs_logprob_diff(engine.model, batch, temperature) < 1e-3


def test_samples_do_not_depend_on_slots_prompt_order_or_history(varied, tiny_model_dir):
    prompts, params = varied
    two = _engine(tiny_model_dir, "rollout.infinite_sampling.max_concurrent=2")
    five = _engine(tiny_model_dir, "rollout.infinite_sampling.max_concurrent=5")
    first = two.generate(prompts, params)
    assert two.generate(prompts, params).completion_texts == first.completion_texts  # predictor trained now
    rev = five.generate(prompts[::-1], params).completion_texts
    assert first.completion_texts == rev[10:] + rev[5:10] + rev[:5]
    other = two.generate(prompts, SamplingParams(group_size=5, max_new_tokens=16, seed=12, stop=params.stop))
    assert other.completion_texts != first.completion_texts


def test_memory_budget_sets_g_from_the_kv_size(plain, varied, tiny_model_dir):
    prompts, params = varied
    ids = prompts[0].token_ids
    state = prefill(plain.model, ids, 1)
    kv_bytes_per_token = sum(k.numel() + v.numel() for k, v in state.kv) * 4 / len(ids)
    max_len = max(len(p.token_ids) for p in prompts) + params.max_new_tokens
    per_slot = kv_bytes_per_token * max_len + 3 * plain.model.config.vocab_size * 4
    budget_mb = 3.5 * per_slot / 2 ** 20
    assert slots_for_budget(plain.model.config, budget_mb, max_len, 4) == 3
    engine = _engine(tiny_model_dir, f"rollout.infinite_sampling.memory_budget_mb={budget_mb}")
    _assert_same_batch(plain.generate(prompts, params), engine.generate(prompts, params))
    assert engine.infinite.last_slots == 3 and engine.infinite.last_stats.max_concurrent == 3


def test_predictor_learns_lengths_from_prompt_tokens():
    predictor = LengthPredictor(buckets=16)
    assert predictor.predict((1, 2, 3), prior=64.0) == 64.0
    rng = random.Random(0)
    for _ in range(40):  # prompts made of token 5 complete in ~10 tokens, of token 9 in ~50
        predictor.update((5,) * rng.choice([3, 4, 8, 9]), [10 + rng.random()])
        predictor.update((9,) * rng.choice([3, 4, 8, 9]), [50 + rng.random()])
    short, long = predictor.predict((5,) * 6, 0.0), predictor.predict((9,) * 6, 0.0)  # unseen prompts
    assert abs(short - 10.5) < 3 and abs(long - 50.5) < 3
    predictor.update((7, 7), [4, 6])
    predictor.update((7, 7), [8])
    assert predictor.predict((7, 7), 0.0) == pytest.approx(6.5)  # exact prompt: mean of its groups' means


def _makespan(lanes, lengths):
    return max(sum(lengths[i] for i in lane) for lane in lanes)


def test_plan_balances_lanes_within_lpt_bound_and_orders_shortest_first():
    rng = random.Random(1)
    for _ in range(30):
        lanes, n = rng.randint(2, 3), rng.randint(3, 8)
        lengths = [rng.randint(1, 100) for _ in range(n)]
        plan = plan_lanes(lengths, lanes)
        assert sorted(i for lane in plan for i in lane) == list(range(n))
        assert all(lane == sorted(lane, key=lambda i: (lengths[i], i)) for lane in plan)
        best = min(max(sum(lengths[i] for i in range(n) if a[i] == k) for k in range(lanes))
                   for a in itertools.product(range(lanes), repeat=n))
        assert _makespan(plan, lengths) <= (4 / 3 - 1 / (3 * lanes)) * best + 1e-9


def test_scheduler_serves_its_lane_then_steals_the_shortest_from_the_busiest():
    lengths = [5, 1, 9, 3, 7]
    scheduler = LaneScheduler([[1, 0], [3, 4, 2]], lengths)
    assert [scheduler(0), scheduler(0)] == [1, 0]
    assert scheduler(0) == 3 and scheduler(1) == 4 and scheduler(0) == 2
    assert scheduler(1) is None and not scheduler.pending()


def test_config_is_off_by_default_and_checked():
    assert not load_job("tiny").rollout.infinite_sampling.enabled
    with pytest.raises(UserError, match="order"):
        load_job("tiny", ["rollout.infinite_sampling.order=lifo"])
    with pytest.raises(UserError, match="max_concurrent"):
        load_job("tiny", ["rollout.infinite_sampling.max_concurrent=0"])
    with pytest.raises(UserError, match="kv_cache_gib"):
        load_job("tiny", ["rollout.backend=vllm", "rollout.infinite_sampling.memory_budget_mb=100"])
