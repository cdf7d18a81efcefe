import math

import pytest
import torch

from rl.config.algorithm import DrGRPOAdvantage, GRPOAdvantage, RLOOAdvantage
from trainers.advantages import dr_grpo, grpo, rloo

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0])
G = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])


def test_grpo_matches_hand_computation():
    adv = grpo(R, G, GRPOAdvantage(eps=1e-6))
    std0 = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    expected0 = [(r - 0.5) / (std0 + 1e-6) for r in (1.0, 0.0, 0.0, 1.0)]
    assert adv[:4].tolist() == pytest.approx(expected0, rel=1e-6)
    assert adv[4:7].tolist() == [0.0, 0.0, 0.0]  # all-equal group: zero, not NaN
    assert adv[7].item() == pytest.approx(2.0 / (1 + 1e-6))  # group of one: A = R (verl)
    assert torch.isfinite(adv).all()


def test_grpo_batch_std_scope():
    adv = grpo(R, G, GRPOAdvantage(eps=1e-9, std_scope="batch"))
    assert adv[0].item() == pytest.approx((1.0 - 0.5) / R.std().item(), rel=1e-6)


def test_dr_grpo_and_rloo():
    assert dr_grpo(R, G, DrGRPOAdvantage())[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    r = rloo(R, G, RLOOAdvantage())
    assert r[0].item() == pytest.approx(1.0 - (0 + 0 + 1) / 3)  # R_i minus the mean of the others
    assert r[4:7].tolist() == [0.0, 0.0, 0.0] and r[7].item() == 0.0
