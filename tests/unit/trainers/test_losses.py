import math

import pytest
import torch
from trainer_testlib import build_batch, build_lm

from rl.config.algorithm import GSPOLoss, GSPOTokenLoss, PPOClipLoss, ReinforceLoss, SeqMeanTokenMean, TokenMean
from trainers.aggregation import Normalisers, seq_mean_token_mean, token_mean
from trainers.losses import (
    gspo,
    gspo_token,
    kl_penalty,
    mismatch_kl,
    mismatch_weights,
    ppo_clip,
    reinforce,
    sequence_log_ratio,
)

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # uneven lengths 3 and 2
NORM = Normalisers.of(MASK, constant_length=4)
PPO = PPOClipLoss(clip_low=0.2, clip_high=0.28)


def _ppo_token_grad(ratio: float, adv: float) -> float:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = ppo_clip(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), PPO)
    loss.sum().backward()
    return logp.grad.item()


@pytest.mark.parametrize("ratio,adv,expected", [
    (1.5, 1.0, 0.0),     # above 1+eps_high with A>0: clipped, no gradient (ALGORITHMS.md §1.6 test 3)
    (1.5, -1.0, 1.5),    # A<0: the unclipped side, d(-A r)/dlogp = -A r
    (0.5, -1.0, 0.0),    # mirror: below 1-eps_low with A<0: clipped
    (0.5, 1.0, -0.5),    # A>0 at r<1: unclipped
    (1.2, 1.0, -1.2),    # inside the asymmetric range (1.2 < 1.28): unclipped
])
def test_ppo_clip_token_gradients(ratio, adv, expected):
    assert _ppo_token_grad(ratio, adv) == pytest.approx(expected)


def test_ppo_clip_values_gradients_and_stats_with_masks():
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 9.0], [0.7, 1.1, 9.0, 9.0]])).requires_grad_(True)  # 9 = padding
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    loss, stats = ppo_clip(logp, torch.zeros(2, 4), adv, MASK, PPO)
    assert loss[0, :3].tolist() == pytest.approx([-1.28, -1.0, -0.5])
    assert loss[1, :2].tolist() == pytest.approx([0.8, 1.1])
    token_mean(loss, MASK, NORM, TokenMean()).backward()
    expected = torch.tensor([[0.0, -1.0, -0.5, 0.0], [0.0, 1.1, 0.0, 0.0]]) / 5
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1 + 0.5 + 0.7 + 1.1) / 5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)  # padding's ratio 9 is ignored


def test_gspo_sequence_ratio_value():
    # ALGORITHMS.md §2.6 test 3: token log-ratios [0.1, -0.1, 0.3] -> s = exp(0.1).
    log_s = sequence_log_ratio(torch.tensor([[0.1, -0.1, 0.3, 5.0]]), torch.zeros(1, 4), MASK[:1])
    assert math.exp(log_s.item()) == pytest.approx(1.10517, abs=1e-5)


def test_gspo_ratio_one_gives_length_normalised_sequence_gradient():
    logp = torch.log(torch.rand(2, 4) * 0.5 + 0.25).requires_grad_(True)
    adv = torch.tensor([[2.0] * 4, [-1.0] * 4])
    loss, _ = gspo(logp, logp.detach(), adv, MASK, GSPOLoss())
    seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean()).backward()
    # J = (1/B) sum_i -A_i s_i, ds_i/dlogp_t = s_i / |y_i| with s_i = 1.
    expected = torch.tensor([[-2 / 3] * 3 + [0.0], [1 / 2, 1 / 2, 0.0, 0.0]]) / 2
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_gspo_ratio_one_parameter_gradient_on_a_model_fp64():
    """ALGORITHMS.md §2.6 test 1 on a tiny fp64 model: grad of the GSPO loss at pi_old = pi equals the grad of
    -(1/G) sum_i A_i (1/|y_i|) sum_t log pi(y_it)."""
    from trainers.logprobs import token_logprobs

    model = build_lm(dtype=torch.float64)
    batch = build_batch([2, 3, 4, 2], [3, 1, 4, 2], group_size=4)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75], dtype=torch.float64)
    mask = batch.loss_mask.double()

    def grads(objective):
        model.zero_grad()
        logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_tokens=3)
        objective(logp.double()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def gspo_objective(logp):
        loss, _ = gspo(logp, logp.detach(), adv.unsqueeze(1).expand_as(logp), mask, GSPOLoss())
        return seq_mean_token_mean(loss, mask, Normalisers.of(mask, 1), SeqMeanTokenMean())

    explicit = lambda logp: -(adv * (logp * mask).sum(1) / mask.sum(1)).mean()  # noqa: E731
    a, b = grads(gspo_objective), grads(explicit)
    assert b.abs().max() > 1e-4
    assert torch.allclose(a, b, atol=1e-10)


def test_gspo_clips_whole_sequences():
    # ALGORITHMS.md §2.6 test 4. Row 0: tokens individually far off but s = 1; row 1: s = 1 + 2 eps_high.
    eps = 4e-4
    target = math.log(1 + 2 * eps)
    logp = torch.tensor([[0.5, -0.5, 0.0, 0.0], [target + 0.3, target - 0.3, 7.0, 7.0]]).requires_grad_(True)
    loss, stats = gspo(logp, torch.zeros(2, 4), torch.ones(2, 4), MASK, GSPOLoss(clip_low=3e-4, clip_high=eps))
    seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean()).backward()
    assert torch.allclose(logp.grad[0, :3], torch.full((3,), -1 / 6))  # unclipped: -A s/|y| / B
    assert torch.equal(logp.grad[1], torch.zeros(4))  # every token of the clipped sequence: exactly 0
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)
    # With A < 0 the same sequence is on the unclipped side and keeps its gradient.
    logp.grad = None
    loss, _ = gspo(logp, torch.zeros(2, 4), -torch.ones(2, 4), MASK, GSPOLoss(clip_low=3e-4, clip_high=eps))
    seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean()).backward()
    assert (logp.grad[1, :2] > 0).all()


@pytest.mark.parametrize("fn,cfg", [(gspo, GSPOLoss()), (gspo_token, GSPOTokenLoss())])
def test_gspo_padding_invariance(fn, cfg):
    # ALGORITHMS.md §2.6 test 5: arbitrary values on padding change neither loss nor gradients.
    torch.manual_seed(1)
    base, old, adv = torch.randn(2, 4) * 1e-4, torch.randn(2, 4) * 1e-4, torch.randn(2, 4)
    out = []
    for pad in (0.0, 13.0):
        logp = torch.where(MASK > 0, base, torch.full_like(base, pad)).requires_grad_(True)
        loss, _ = fn(logp, torch.where(MASK > 0, old, -torch.full_like(old, pad)), adv, MASK, cfg)
        value = seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean())
        value.backward()
        out.append((value.item(), logp.grad.clone()))
    assert out[0][0] == out[1][0] and torch.equal(out[0][1], out[1][1])


def test_gspo_token_equals_gspo_for_sequence_constant_advantages():
    # ALGORITHMS.md §2.6 test 2: away from theta_old (ratios != 1, one sequence clipped), same value and grads.
    torch.manual_seed(0)
    old = torch.randn(2, 4) * 0.01
    base = old + torch.tensor([[0.3, -0.1, 0.2, 0.0], [0.01, -0.02, 0.0, 0.0]])
    adv = torch.tensor([[1.5] * 4, [-0.5] * 4])
    results = []
    for fn, cfg in ((gspo, GSPOLoss(clip_low=0.05, clip_high=0.05)),
                    (gspo_token, GSPOTokenLoss(clip_low=0.05, clip_high=0.05))):
        logp = base.clone().requires_grad_(True)
        loss, stats = fn(logp, old, adv, MASK, cfg)
        value = seq_mean_token_mean(loss, MASK, NORM, SeqMeanTokenMean())
        value.backward()
        results.append((value.item(), logp.grad.clone(), stats["clip_frac_high"].item()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)
    assert results[0][2] == results[1][2] == pytest.approx(3 / 5)  # row 0 (s = e^0.133 > 1.05) clipped in both
    assert results[0][1][1].abs().sum() > 0


def test_gspo_token_uses_per_token_advantages():
    logp = torch.zeros(1, 4, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 3.0, 0.0]])
    loss, _ = gspo_token(logp, torch.zeros(1, 4), adv, MASK[:1], GSPOTokenLoss())
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, 2.0, -3.0, 0.0])  # -A_t s grad log pi_t, s = 1


def test_reinforce_gradient_is_minus_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25, 1.0, 1.0]])).requires_grad_(True)
    loss, stats = reinforce(logp, logp.detach() - 1.0, torch.full((1, 4), 2.0), MASK[:1], ReinforceLoss())
    loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0] * 4]  # no ratio, no clipping, even when pi != pi_old
    assert stats["clip_frac_high"].item() == 0.0 and stats["ratio_mean"].item() == pytest.approx(math.e)


def test_k3_value_zero_point_and_gradient():
    # ALGORITHMS.md §1.6 test 4: zero value and gradient at pi = pi_ref; pi_ref/pi = 2 gives 2 - log 2 - 1.
    logp = torch.log(torch.tensor([0.3, 0.2])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.3, 0.4]))
    k3 = kl_penalty(logp, ref, "k3")
    assert k3.tolist() == pytest.approx([0.0, 2 - math.log(2) - 1], abs=1e-6)
    k3.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 1 - 2.0], abs=1e-6)  # d k3 / d log pi = 1 - pi_ref/pi
    big = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3")
    assert big.item() == 10.0  # clamped as verl does


def test_k1_is_the_log_ratio():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])


def test_truncated_importance_weights():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2, 1.0]]))
    sampler = torch.log(torch.tensor([[0.5, 0.3, 0.4, 0.01]]))  # the last (padding) position must not count
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert mismatch_weights(old, sampler, mask, "token", cap=2.0)[0, :3].tolist() == pytest.approx([1.0, 2.0, 0.5])
    assert mismatch_weights(old, sampler, mask, "sequence", cap=10.0)[0, 0].item() == pytest.approx(1.5)
    assert mismatch_weights(old, sampler, mask, "sequence", cap=1.2)[0].tolist() == pytest.approx([1.2] * 4)
    assert torch.equal(mismatch_weights(old, sampler, mask, "none", cap=2.0), torch.ones(1, 4))


def test_mismatch_kl_metric():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.7]]))
    assert mismatch_kl(old, old, torch.ones(1, 3)).item() == 0.0
    sampler = torch.log(torch.tensor([[0.5, 0.4, 0.7]]))  # r = 0.5 on the middle token
    assert mismatch_kl(old, sampler, torch.ones(1, 3)).item() == pytest.approx((0.5 - math.log(0.5) - 1) / 3)


def test_every_builtin_loss_registers_an_objective_with_its_flags():
    from rl.config.algorithm import RapidLoss
    from rl.registries import LOSSES
    from rl.types import Objective

    assert all(isinstance(LOSSES.get(name), Objective) for name in LOSSES.names())
    rapid = LOSSES.get("rapid")
    assert rapid.needs_whole_groups and rapid.prepare is not None
    assert rapid.needs_old_logprobs(RapidLoss())
    assert not rapid.needs_old_logprobs(RapidLoss(behaviour_logprobs="sampler"))
    assert LOSSES.get("lp_reg").prepare is not None and not LOSSES.get("lp_reg").needs_whole_groups
    plain = [LOSSES.get(name) for name in ("ppo_clip", "gspo", "gspo_token", "reinforce")]
    assert all(o.prepare is None and not o.needs_whole_groups and o.needs_old_logprobs(None) for o in plain)
