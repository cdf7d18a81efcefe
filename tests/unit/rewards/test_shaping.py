"""PAR shaping and clipping (ALGORITHMS.md §7.6)."""

import math

import pytest
import torch

from rewards.scoring import build_scorer
from rewards.shaping import par
from rl.config.rewards import RewardConfig, ShapingConfig
from rl.errors import UserError


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_par_matches_hand_computed_values():
    r = torch.tensor([2.0, 1.0, 0.0, 5.0])
    refs = [[1.0, 3.0], [1.0, 1.0, 1.0], [1.0], [0.0, 2.0, 4.0]]
    expected = [0.5, 0.5, sigmoid(-1), (sigmoid(5) + sigmoid(3) + sigmoid(1)) / 3]
    assert torch.allclose(par(r, refs), torch.tensor(expected))
    assert par(torch.tensor([1.0]), [[0.0]], k=2.0).item() == pytest.approx(0.8808, abs=1e-4)
    assert par(torch.tensor([1.0]), [[0.0] + [5.0] * 9], max_refs=1).item() == pytest.approx(sigmoid(1))


def test_par_is_bounded_in_open_unit_interval():
    r = torch.tensor([-30.0, -3.0, 0.0, 3.0, 30.0], dtype=torch.float64)
    out = par(r, [[0.0, 1.0]] * 5)
    assert bool(((out > 0) & (out < 1)).all()) and bool((out.diff() > 0).all())


def test_scorer_clips_then_applies_par(make_batch):
    shaping = ShapingConfig(clip=(0.0, 1.0), par=True)
    batch = make_batch(["x" * 10, "x"], meta=[{"ref_rewards": [0.0]}, {"ref_rewards": [0.0, 0.0]}])
    cfg = RewardConfig(name="length_penalty", weight=-10.0, kwargs={"max_chars": 5})  # totals 10 and 0
    with build_scorer([cfg], shaping) as scorer:
        total = scorer.score(batch).total
    assert total.tolist() == pytest.approx([sigmoid(1.0), 0.5])
    with build_scorer([cfg], shaping) as scorer, pytest.raises(UserError, match="ref_rewards"):
        scorer.score(make_batch(["x"]))


def test_clip_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="low must not exceed high"):
        ShapingConfig(clip=(1.0, 0.0))
