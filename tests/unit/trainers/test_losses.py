import pytest
import torch

from rl.config.algorithm import (ConstantNorm, GSPOLoss, GSPOTokenLoss, PPOClipLoss, ReinforceLoss, SeqMeanTokenMean,
                                 SeqMeanTokenSum, TokenMean)
from trainers.aggregation import Normalisers, constant, seq_mean_token_mean, seq_mean_token_sum, token_mean
from trainers.losses import gspo, gspo_token, kl_penalty, mismatch_weights, ppo_clip, reinforce

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # uneven lengths 3 and 2
NORM = Normalisers(tokens=5.0, sequences=2.0, constant_length=4.0)


def test_ppo_clip_values_gradients_and_clip_fractions():
    old = torch.zeros(2, 4)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 1.0], [0.7, 1.1, 1.0, 1.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    loss, stats = ppo_clip(logp, old, adv, MASK, PPOClipLoss(clip_low=0.2, clip_high=0.28))
    # row 0 (A=+1): r=1.5 clipped at 1.28; r=1.0; r=0.5 unclipped (min picks r A). row 1 (A=-1): r=0.7 clipped at 0.8.
    assert loss[0, :3].tolist() == pytest.approx([-1.28, -1.0, -0.5])
    assert loss[1, :2].tolist() == pytest.approx([0.8, 1.1])
    token_mean(loss, MASK, NORM, TokenMean()).backward()
    # d/dlogp of -A r is -A r where unclipped, 0 where clipped; divided by 5 tokens.
    expected = torch.tensor([[0.0, -1.0, -0.5, 0.0], [0.0, 1.1, 0.0, 0.0]]) / 5
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5) and stats["clip_frac_low"].item() == pytest.approx(1 / 5)


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0]])  # 100s are masked out
    assert token_mean(loss, MASK, NORM, TokenMean()).item() == pytest.approx(16 / 5)
    assert seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean()).item() == pytest.approx((2 + 5) / 2)
    assert seq_mean_token_sum(loss, MASK, NORM, SeqMeanTokenSum()).item() == pytest.approx((6 + 10) / 2)
    assert constant(loss, MASK, NORM, ConstantNorm(max_length=4)).item() == pytest.approx(16 / (2 * 4))


def test_gspo_ratio_one_gives_length_normalised_sequence_gradient():
    logp = torch.log(torch.rand(2, 4) * 0.5 + 0.25).requires_grad_(True)
    adv = torch.tensor([[2.0] * 4, [-1.0] * 4])
    loss, _ = gspo(logp, logp.detach(), adv, MASK, GSPOLoss())
    seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean()).backward()
    # J = (1/B) sum_i -A_i s_i, ds_i/dlogp_t = s_i / |y_i| with s_i = 1.
    expected = torch.tensor([[-2 / 3] * 3 + [0.0], [1 / 2, 1 / 2, 0.0, 0.0]]) / 2
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_gspo_clips_whole_sequences():
    old = torch.zeros(2, 4)
    # Row 0: tokens individually far outside the range but the sequence ratio is 1; row 1: whole sequence high.
    logp = torch.tensor([[0.5, -0.5, 0.0, 0.0], [0.01, 0.01, 0.0, 0.0]]).requires_grad_(True)
    adv = torch.ones(2, 4)
    loss, stats = gspo(logp, old, adv, MASK, GSPOLoss(clip_low=3e-4, clip_high=4e-4))
    seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean()).backward()
    assert logp.grad[0, :3].abs().sum() > 0  # not clipped: its sequence ratio is exactly 1
    assert logp.grad[1].abs().sum() == 0  # the whole sequence is clipped together
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)


def test_gspo_token_equals_gspo_for_sequence_constant_advantages():
    torch.manual_seed(0)
    old = torch.randn(2, 4) * 0.01
    base = torch.randn(2, 4) * 0.01
    adv = torch.tensor([[1.5] * 4, [-0.5] * 4])
    grads = []
    for fn, cfg in ((gspo, GSPOLoss(clip_low=0.2, clip_high=0.2)), (gspo_token, GSPOTokenLoss(clip_low=0.2, clip_high=0.2))):
        logp = base.clone().requires_grad_(True)
        loss, _ = fn(logp, old, adv, MASK, cfg)
        value = seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean())
        value.backward()
        grads.append((value.item(), logp.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-7)


def test_reinforce_and_kl_estimators():
    logp = torch.log(torch.tensor([[0.5, 0.25, 1.0, 1.0]])).requires_grad_(True)
    loss, _ = reinforce(logp, logp.detach(), torch.full((1, 4), 2.0), MASK[:1], ReinforceLoss())
    loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0] * 4]
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.5, 1.0]]))
    k3 = kl_penalty(logp.detach(), ref, "k3")
    expected = [0.5 - torch.log(torch.tensor(0.5)).item() - 1, 0.0, 0.5 - torch.log(torch.tensor(0.5)).item() - 1, 0.0]
    assert k3[0].tolist() == pytest.approx(expected, abs=1e-6) and (k3 >= 0).all()
    assert kl_penalty(logp.detach(), ref, "k1")[0].tolist() == pytest.approx((logp.detach() - ref)[0].tolist())


def test_truncated_importance_weights():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2, 1.0]]))
    sampler = torch.log(torch.tensor([[0.5, 0.3, 0.4, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = mismatch_weights(old, sampler, mask, "token", cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, 0.5, 1.0])  # 3.0 capped at 2
    seq = mismatch_weights(old, sampler, mask, "sequence", cap=10.0)
    assert seq[0, 0].item() == pytest.approx(1.0 * 3.0 * 0.5)
