import pytest
import torch

from rl.config.algorithm import ConstantNorm, SeqMeanTokenMean, SeqMeanTokenSum, TokenMean
from rl.registries import AGGREGATIONS
from trainers.aggregation import Normalisers

# ALGORITHMS.md §1.6 test 5: lengths 1 and 3; seq 1 loss [1], seq 2 losses [1, 2, 3]; 99s are padding.
LOSS = torch.tensor([[1.0, 99.0, 99.0], [1.0, 2.0, 3.0]])
MASK = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
NORM = Normalisers.of(MASK, constant_length=4)
CASES = {  # name: (config, value, d value / d loss)
    "token_mean": (TokenMean(), 1.75, MASK / 4),
    "seq_mean_token_mean": (SeqMeanTokenMean(), 1.5, torch.tensor([[1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]])),
    "seq_mean_token_sum": (SeqMeanTokenSum(), 3.5, MASK / 2),
    "constant": (ConstantNorm(max_length=4), 0.875, MASK / 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_aggregation_value_and_gradient_by_hand(name):
    cfg, value, grad = CASES[name]
    loss = LOSS.clone().requires_grad_(True)
    out = AGGREGATIONS.get(name)(loss, MASK, NORM, cfg)
    out.backward()
    assert out.item() == pytest.approx(value)
    assert torch.allclose(loss.grad, grad)  # padding gets exactly zero gradient


@pytest.mark.parametrize("name", sorted(CASES))
def test_sum_over_micro_batches_with_global_normalisers_equals_the_whole(name):
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.arange(5) < torch.tensor([5, 1, 3, 4, 2, 5]).unsqueeze(1)).float()  # uneven lengths
    cfg, fn = CASES[name][0], AGGREGATIONS.get(name)
    norm = Normalisers.of(mask, constant_length=7)
    whole = fn(loss, mask, norm, cfg)
    parts = sum(fn(loss[i:i + 1], mask[i:i + 1], norm, cfg) for i in range(6))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)
    # The micro-batch's *own* counts would give a different (wrong) answer for token_mean: the check bites.
    if name == "token_mean":
        local = sum(fn(loss[i:i + 1], mask[i:i + 1], Normalisers.of(mask[i:i + 1], 7), cfg) for i in range(6))
        assert abs(local.item() - whole.item()) > 1e-3


def test_empty_sequences_count_as_sequences_and_contribute_zero():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = AGGREGATIONS.get("seq_mean_token_mean")(torch.ones(2, 2), mask, Normalisers.of(mask, 2), SeqMeanTokenMean())
    assert out.item() == pytest.approx(0.5)
