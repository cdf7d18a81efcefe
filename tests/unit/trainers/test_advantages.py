import math

import pytest
import torch

from rl.config.algorithm import DrGRPOAdvantage, GRPOAdvantage, RLOOAdvantage
from rl.registries import ADVANTAGES
from trainers.advantages import dr_grpo, grpo, rloo

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0])
G = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])  # groups of 4, 3 (all equal) and 1
CONFIGS = {"grpo": GRPOAdvantage(), "dr_grpo": DrGRPOAdvantage(), "rloo": RLOOAdvantage()}


def test_grpo_matches_algorithms_md_reference():
    # ALGORITHMS.md §1.6 test 1: [1,0,0,1] -> mean 0.5, unbiased std 0.5774 -> +-0.866 (eps -> 0).
    adv = grpo(R[:4], G[:4], GRPOAdvantage(eps=1e-12))
    assert adv.tolist() == pytest.approx([0.8660254, -0.8660254, -0.8660254, 0.8660254], abs=1e-6)


def test_grpo_eps_single_groups_and_equal_rewards():
    adv = grpo(R, G, GRPOAdvantage(eps=1e-6))
    std0 = math.sqrt(((0.5**2) * 4) / 3)  # Bessel-corrected, as verl's torch.std
    assert adv[:4].tolist() == pytest.approx([(r - 0.5) / (std0 + 1e-6) for r in (1.0, 0.0, 0.0, 1.0)], rel=1e-6)
    assert adv[4:7].tolist() == [0.0, 0.0, 0.0]  # all-equal group: exactly zero, not NaN
    assert adv[7].item() == pytest.approx(2.0 / (1 + 1e-6))  # group of one: mean 0, std 1 -> A = R (verl)


def test_grpo_batch_std_scope_divides_by_the_whole_batch_std():
    adv = grpo(R, G, GRPOAdvantage(eps=1e-9, std_scope="batch"))
    batch_std = R.std().item()
    assert adv[0].item() == pytest.approx((1.0 - 0.5) / batch_std, rel=1e-6)
    assert adv[4:7].tolist() == [0.0, 0.0, 0.0]


def test_dr_grpo_is_mean_centred_only():
    adv = dr_grpo(R, G, DrGRPOAdvantage())
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_rloo_subtracts_the_mean_of_the_others():
    adv = rloo(R, G, RLOOAdvantage())
    assert adv[:4].tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal group, and a group of one has no baseline


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_advantage_is_registered_finite_and_zero_for_equal_rewards(name):
    fn = ADVANTAGES.get(name)
    rewards = torch.tensor([3.0, 3.0, 3.0, 3.0, 0.0, 0.0])
    adv = fn(rewards, torch.tensor([0, 0, 0, 0, 1, 1]), CONFIGS[name])
    assert adv.shape == (6,) and adv.dtype == torch.float32
    assert torch.equal(adv, torch.zeros(6))


def test_group_statistics_do_not_leak_across_groups():
    # Same rewards, different group boundaries: the first group's advantages depend only on it.
    a = grpo(torch.tensor([1.0, 0.0, 5.0, 9.0]), torch.tensor([0, 0, 1, 1]), GRPOAdvantage())
    b = grpo(torch.tensor([1.0, 0.0, -7.0, 0.0]), torch.tensor([0, 0, 1, 1]), GRPOAdvantage())
    assert torch.equal(a[:2], b[:2])
