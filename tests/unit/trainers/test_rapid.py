"""RAPID (ALGORITHMS.md §8.6): on-policy reduction, unbiasedness on a bandit, clipping, group integrity,
and the trainer running it over several mini-batches."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_testlib import assert_same_updates, build_batch, build_lm, record_updates

from rl.config.algorithm import AlgorithmConfig, RapidLoss
from rl.config.job import TrainerConfig
from trainers.advantages import dr_grpo, rloo
from trainers.logprobs import token_logprobs
from trainers.losses import reinforce
from trainers.microbatch import group_micro_batches, pack_groups
from trainers.policy import PolicyTrainer
from trainers.rapid import rapid, weighted_group_advantage

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.25])
GROUPS = torch.arange(8) // 4


def _tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(8, 5, generator=g, dtype=torch.float64) * 2
    mask = (torch.rand(8, 5, generator=g) > 0.2).double()
    mask[:, 0] = 1
    return logp, mask


@pytest.mark.parametrize("baseline, advantage", [("leave_one_out", rloo), ("weighted_mean", dr_grpo)])
def test_on_policy_mini_batch_is_the_group_policy_gradient(baseline, advantage):
    """theta = theta_b: w = 1 and the loss and gradient equal REINFORCE with the group baseline (RLOO's
    leave-one-out mean, or Dr.GRPO's group mean)."""
    logp, mask = _tokens()
    a = logp.clone().requires_grad_()
    loss, stats = rapid(a, logp, None, mask, RapidLoss(baseline=baseline), rewards=REWARDS, group_ids=GROUPS)
    (loss * mask).sum().backward()
    adv = advantage(REWARDS, GROUPS, None).double().unsqueeze(1).expand_as(logp)
    b = logp.clone().requires_grad_()
    ref, _ = reinforce(b, logp, adv, mask, None)
    (ref * mask).sum().backward()
    torch.testing.assert_close(loss, ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=0)
    assert float(stats["rapid/weight_mean"]) == 1.0 and float(stats["rapid/ess_frac"]) == pytest.approx(1.0)


def test_weights_are_clipped_at_eta_and_carry_no_gradient():
    """Two responses, rewards [1, 0], sequence weights [3, 1] -> used [2, 1]; b = (2*1 + 1*0)/2 = 1, A = [0, -1]."""
    behaviour = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    logp = behaviour + torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    theta = logp.clone().requires_grad_()
    mask = torch.ones_like(logp)
    cfg = RapidLoss(eta=2.0, baseline="weighted_mean")
    loss, stats = rapid(theta, behaviour, None, mask, cfg, rewards=torch.tensor([1.0, 0.0]),
                        group_ids=torch.tensor([0, 0]))
    loss.sum().backward()
    # The gradient is -A per token: had it flowed through w, row 0 would not be exactly 0.
    torch.testing.assert_close(theta.grad, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    assert float(stats["rapid/weight_clipped_frac"]) == 0.5


@pytest.mark.parametrize("baseline, expected", [
    ("weighted_mean", [2 * (1 - 1.0), 1 * (0 - 1.0)]),
    ("self_normalised", [2 * (1 - 2 / 3), 1 * (0 - 2 / 3)]),
    ("leave_one_out", [2 * (1 - 0.0), 1 * (0 - 2.0)]),
])
def test_baselines_by_hand(baseline, expected):
    adv = weighted_group_advantage(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]), torch.tensor([0, 0]),
                                   RapidLoss(baseline=baseline))
    torch.testing.assert_close(adv, torch.tensor(expected))


@pytest.mark.parametrize("baseline, off_policy, scale",
                         [("leave_one_out", True, 1.0), ("weighted_mean", False, 0.75)])
def test_unbiased_on_a_bandit(baseline, off_policy, scale):
    """Categorical policy over 5 responses; groups of G = 4 drawn from pi_b with unclipped weights. The mean
    estimate matches scale x grad E_pi[R] within 5 Monte-Carlo standard errors: leave-one-out exactly, off
    policy; the in-group weighted mean (which holds the sample's own w_i R_i) on policy, shrunk by (G-1)/G
    as GRPO's in-group mean is. Off policy the latter's own term w_i^2 R_i biases it: hence the default."""
    g = torch.Generator().manual_seed(0)
    reward = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    theta = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.1], dtype=torch.float64)
    pi = torch.softmax(theta, 0)
    pi_b = torch.softmax(torch.tensor([0.0, 0.4, -0.2, 0.3, 0.0], dtype=torch.float64), 0) if off_policy else pi
    exact = pi * (reward - (pi * reward).sum())  # grad_theta E_pi[R] for softmax logits
    groups, G = 100_000, 4  # noqa: N806 - G: the group size, as in the docstring and the paper
    y = torch.multinomial(pi_b, groups * G, replacement=True, generator=g)  # [N]
    ids = torch.arange(groups * G) // G
    logp = torch.log_softmax(theta, 0)[y].unsqueeze(1)  # [N, 1], pi_theta(y)
    adv = weighted_group_advantage(reward[y], (pi[y] / pi_b[y]), ids, RapidLoss(baseline=baseline)).double()
    per_sample = adv.unsqueeze(1) * (torch.nn.functional.one_hot(y, 5).double() - pi)  # A_i grad log pi(y_i)
    per_group = per_sample.view(groups, G, 5).sum(1) / G  # [groups, 5]
    mean, se = per_group.mean(0), per_group.std(0) / math.sqrt(groups)
    assert torch.all((mean - scale * exact).abs() < 5 * se), (mean, scale * exact, se)
    # And through the loss itself: its autograd gradient on a slice equals the explicit estimator.
    t = theta.clone().requires_grad_()
    lp = torch.log_softmax(t, 0)[y[:400]].unsqueeze(1)
    loss, _ = rapid(lp, torch.log(pi_b[y[:400]]).unsqueeze(1), None, torch.ones_like(lp),
                    RapidLoss(baseline=baseline, eta=1e9), rewards=reward[y[:400]], group_ids=ids[:400])
    loss.sum().backward()
    torch.testing.assert_close(-t.grad, per_sample[:400].sum(0), atol=1e-9, rtol=0)
    assert logp.shape == (groups * G, 1)


def test_group_packing_never_splits_a_group():
    g = torch.Generator().manual_seed(1)
    group_ids = torch.repeat_interleave(torch.arange(12), torch.randint(1, 6, (12,), generator=g)).tolist()
    lengths = torch.randint(1, 20, (len(group_ids),), generator=g).tolist()
    for budget in (1, 15, 40, 10_000):
        packs = pack_groups(group_ids, lengths, budget)
        assert sorted(r for p in packs for r in p) == list(range(len(group_ids)))
        for gid in set(group_ids):
            assert sum(any(group_ids[r] == gid for r in p) for p in packs) == 1


def _trainer(model, **loss):
    algo = AlgorithmConfig.model_validate({"loss": {"name": "rapid", **loss}, "correction": {"level": "none"}})
    cfg = TrainerConfig.model_validate({"lr": 1e-3, "max_steps": 4, "mini_batches": 2, "micro_batch_tokens": 10_000})
    return PolicyTrainer(model, algo, cfg, temperature=1.0, device="cpu")


def _batch():
    batch = build_batch([3, 5, 4, 2, 6, 3, 4, 5], [4, 1, 6, 3, 2, 5, 7, 3], group_size=2, rewards=REWARDS.tolist())
    return batch.with_advantages(torch.zeros(8))


def test_micro_batches_hold_whole_groups_and_accumulation_is_exact():
    """Group micro-batches of any budget give the same gradient at each of RAPID's two mini-batch updates.
    Measured: within 3e-7 of the largest entry at the first update and 1e-6 at the second (which starts from
    weights that AdamW's noise amplification already moved apart, see record_updates); a per-micro-batch
    normaliser or a split group is off by more than 0.3 of it."""
    batch = _batch()
    assert all(len(set(m.group_ids.tolist())) * 2 == m.num_samples for _, m in group_micro_batches(batch, 1))
    updates = []
    for budget in (10_000, 1):  # one micro-batch per mini-batch, or one per group
        trainer = _trainer(build_lm())
        trainer.cfg = trainer.cfg.model_copy(update={"micro_batch_tokens": budget})
        updates.append(record_updates(trainer))
        metrics = trainer.step(batch)
    assert_same_updates(*updates, rtol=1e-5)
    assert metrics["train/updates"] == 2 and 0 < metrics["rapid/ess_frac"] <= 1


def test_second_mini_batch_is_off_policy_and_sampler_logprobs_can_stand_for_the_behaviour_policy():
    batch = _batch()
    metrics = _trainer(build_lm()).step(batch)
    assert metrics["ratio_max"] != pytest.approx(1.0, abs=1e-4)  # the policy moved between the mini-batches
    assert metrics["rapid/weight_mean"] == pytest.approx(1.0, abs=0.05)
    # The sampler's log-probs (here random numbers in (-3, 0), far above the tiny model's ~log(1/64)) as pi_b.
    sampled = _trainer(build_lm(), behaviour_logprobs="sampler").step(batch)
    assert sampled["rapid/weight_mean"] < 0.1


def test_with_sampler_logprobs_on_vllm_the_importance_weight_is_applied_once():
    """The job for vLLM resolves the trainer's correction so that RAPID's sequence weight pi / pi_sampler is the
    only importance weight: the update equals -(1/N_tok) sum_i A_i(w) sum_t log pi(y_t) with
    w_i = min(prod_t pi / pi_sampler, eta), not that times a token TIS weight pi / pi_sampler again."""
    from rl.config import validate_job

    job = validate_job({"algorithm": {"loss": {"name": "rapid", "behaviour_logprobs": "sampler"}},
                        "rollout": {"backend": "vllm"}, "trainer": {"lr": 1e-3, "max_grad_norm": 1e9}}, "job")
    batch = _batch()
    with torch.no_grad():  # a sampler close to the learner (as vLLM is), so the weights are not all clipped
        own, _ = token_logprobs(build_lm(), batch.input_ids, batch.attention_mask, batch.loss_mask)
    offset = (torch.rand(own.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.6 * batch.loss_mask
    batch = batch.replace(sampling_logprobs=(own + offset) * batch.loss_mask)
    model = build_lm()
    PolicyTrainer(model, job.algorithm, job.trainer, temperature=1.0, device="cpu").step(batch)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = build_lm()
    logp, _ = token_logprobs(reference, batch.input_ids, batch.attention_mask, batch.loss_mask)
    mask = batch.loss_mask.float()
    w = torch.minimum(((logp.detach() - batch.sampling_logprobs) * mask).sum(1).exp(), torch.tensor(2.0))
    assert float(w.min()) > 0.2 and float(w.max()) < 2.0  # weights away from 1 and unclipped: a sharp check
    adv = weighted_group_advantage(batch.rewards, w, batch.group_ids, job.algorithm.loss)
    (-(adv.unsqueeze(1) * logp * mask).sum() / mask.sum()).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())
