"""Lp-Reg (ALGORITHMS.md §6.7): the min-p proxy, token selection, gradients, the no-op case, chunked proxy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from trainer_testlib import build_batch, build_lm

from rl.config.algorithm import LpRegLoss, PPOClipLoss
from trainers.logprobs import token_logprobs
from trainers.losses import ppo_clip
from trainers.lp_reg import lp_reg, proxy_logprobs_from_logits, proxy_token_logprobs, select_lowest


def test_min_p_proxy_drops_noise_and_renormalises():
    p = torch.tensor([[0.6, 0.3, 0.09, 0.01]])  # kappa 0.02 -> threshold 0.012: token 3 is noise
    logits = p.log().expand(4, 4)
    got = proxy_logprobs_from_logits(logits, torch.arange(4), threshold=0.02)
    expected = torch.tensor([0.6, 0.3, 0.09]) / 0.99
    torch.testing.assert_close(got[:3], expected.log(), atol=1e-6, rtol=0)
    assert got[3] < -9000  # effectively -inf: exp underflows to 0


def test_fixed_threshold_soft_filter_and_temperature():
    p = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = (p.log() + 2.0).expand(5, 5)  # shifting logits changes nothing
    fixed = proxy_logprobs_from_logits(logits, torch.arange(5), threshold=0.1, mode="fixed")
    torch.testing.assert_close(fixed[:3], (p[:3] / 0.95).log(), atol=1e-6, rtol=0)
    soft = proxy_logprobs_from_logits(logits, torch.arange(5), threshold=0.1, mode="fixed", soft=True)
    z = torch.tensor([0.5, 0.3, 0.15, 0.01, 0.01]).log()  # filtered logits become the smallest logit
    torch.testing.assert_close(soft, torch.log_softmax(z, -1), atol=1e-6, rtol=0)
    hot = proxy_logprobs_from_logits(logits, torch.arange(5), threshold=0.1, mode="fixed", temperature=2.0)
    kept = p[:3].log() / 2.0
    torch.testing.assert_close(hot[:3], kept - torch.logsumexp(kept, 0), atol=1e-6, rtol=0)


def _cfg(**kw) -> LpRegLoss:
    return LpRegLoss(**{"clip_low": 0.2, "clip_high": 0.28, **kw})


def _selection_case():
    """300 negative-advantage tokens and 50 positive ones in one row-set, float64."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(7, 50, generator=g, dtype=torch.float64) * 2 - 0.1  # in (-2.1, -0.1)
    adv = torch.ones(7, 50, dtype=torch.float64)
    adv[:6] = -1.0  # rows 0-5 negative (300 tokens), row 6 positive (50 tokens)
    logp[0, 3], logp[2, 7], logp[4, 9] = -6.0, -5.0, -4.0  # the three lowest negative tokens
    logp[6, 0] = -9.0  # the lowest token overall is positive: must not be selected
    proxy = logp + 0.5  # every token sits below its proxy...
    proxy[2, 7] = -5.5  # ...except one of the three lowest negatives
    mask = torch.ones_like(logp)
    return logp, adv, mask, proxy


def test_selection_takes_the_k_lowest_negatives_below_their_proxy():
    logp, adv, mask, proxy = _selection_case()
    chosen = select_lowest(logp, (mask > 0) & (adv < 0), 0.01)  # k = int(300 * 0.01) = 3
    assert sorted(map(tuple, torch.nonzero(chosen).tolist())) == [(0, 3), (2, 7), (4, 9)]
    loss, stats = lp_reg(logp.clone().requires_grad_(), logp, adv, mask, _cfg(neg_fraction=0.01), proxy)
    base, _ = ppo_clip(logp, logp, adv, mask, PPOClipLoss())
    changed = torch.nonzero(loss.detach() != base).tolist()
    assert sorted(map(tuple, changed)) == [(0, 3), (4, 9)]  # (2, 7) is above its proxy: not protected
    assert float(stats["lp_reg/protected_frac"]) == pytest.approx(2 / 350)


def test_gradient_of_a_protected_token_matches_the_formula():
    logp, adv, mask, proxy = _selection_case()
    old = logp - 0.1  # ratio e^0.1: the protected token uses the unclipped -A r
    theta = logp.clone().requires_grad_()
    beta = 0.7
    loss, _ = lp_reg(theta, old, adv, mask, _cfg(neg_fraction=0.01, coef=beta), proxy)
    loss.sum().backward()
    r = math.exp(0.1)
    for i, j in [(0, 3), (4, 9)]:
        pi_ratio = math.exp(float(proxy[i, j] - logp[i, j]))  # pi_proxy / pi
        expected = -float(adv[i, j]) * r + beta * (1 - pi_ratio)
        assert float(theta.grad[i, j]) == pytest.approx(expected, abs=1e-10)
        assert float(theta.grad[i, j]) < -float(adv[i, j]) * r  # the push-down is softened
    plain = logp.clone().requires_grad_()
    ppo_clip(plain, old, adv, mask, PPOClipLoss())[0].sum().backward()
    untouched = torch.ones_like(mask, dtype=torch.bool)
    untouched[0, 3] = untouched[4, 9] = False
    torch.testing.assert_close(theta.grad[untouched], plain.grad[untouched], atol=0, rtol=0)


def test_too_few_negatives_is_exactly_the_clipped_surrogate():
    logp, adv, mask, proxy = _selection_case()
    logp, adv, mask, proxy = logp[:4, :49], adv[:4, :49], mask[:4, :49], proxy[:4, :49]  # 196 < 2 / 0.01
    old = logp - 0.3
    loss, stats = lp_reg(logp, old, adv, mask, _cfg(neg_fraction=0.01), proxy)
    base, _ = ppo_clip(logp, old, adv, mask, PPOClipLoss())
    assert torch.equal(loss, base) and float(stats["lp_reg/selected_frac"]) == 0.0


def test_positive_branch_is_off_by_default_and_selects_when_on():
    logp, adv, mask, proxy = _selection_case()
    cfg = _cfg(neg_fraction=0.0, pos_fraction=0.04)  # k = int(50 * 0.04) = 2 lowest positives
    loss, _ = lp_reg(logp, logp, adv, mask, cfg, proxy)
    base, _ = ppo_clip(logp, logp, adv, mask, PPOClipLoss())
    assert (loss != base).sum() == 2 and loss[6, 0] != base[6, 0]
    assert torch.equal(lp_reg(logp, logp, adv, mask, _cfg(neg_fraction=0.0), proxy)[0], base)


def test_chunked_proxy_equals_the_full_vocab_reference():
    model = build_lm(vocab=64)
    batch = build_batch([3, 5, 2], [4, 2, 6], group_size=3)
    cfg = SimpleNamespace(proxy="min_p", min_p=0.3, fixed_threshold=0.01, soft_filter=False)  # drops many tokens
    got = proxy_token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, cfg, temperature=0.8,
                               chunk_tokens=3)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits  # [B, T, V]
    rows, cols = torch.nonzero(batch.loss_mask[:, 1:], as_tuple=True)
    ref = proxy_logprobs_from_logits(logits[rows, cols], batch.input_ids[rows, cols + 1], 0.3, temperature=0.8)
    torch.testing.assert_close(got[rows, cols + 1], ref, atol=1e-5, rtol=0)
    assert torch.equal(got[~batch.loss_mask], torch.zeros_like(got[~batch.loss_mask]))
    with torch.no_grad():  # with nothing filtered the proxy is the policy itself
        cfg.min_p = 1e-12
        same = proxy_token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, cfg, 0.8, 4)
        logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, 0.8, 4)
    torch.testing.assert_close(same, logp, atol=1e-5, rtol=0)
