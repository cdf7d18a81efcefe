"""GRPO-MA advantages and objective (ALGORITHMS.md §3.6) against hand-computed references."""

import math

import pytest
import torch

from rl.config.algorithm import PPOClipLoss, SeqMeanTokenSum
from trainers.aggregation import Normalisers, seq_mean_token_sum
from trainers.grpo_ma import (
    Layout,
    answer_advantages,
    diagnostics,
    per_token_advantages,
    segment_masks,
    thought_advantages,
)
from trainers.losses import ppo_clip


def test_hand_reference_k2_m2():
    """§3.6 test 1: rewards [[1,1],[0,1]] -> V = [1, .5], A^th = [+.707, -.707]; global answer advantages
    of [1,1,0,1] (mean .75, unbiased std .5) = [.5, .5, -1.5, .5]."""
    r = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # [P=1, K=2, M=2]
    s = 1 / math.sqrt(2)
    assert torch.allclose(thought_advantages(r, eps=1e-12), torch.tensor([[s, -s]]), atol=1e-6)
    assert torch.allclose(answer_advantages(r, "global", 1e-12), torch.tensor([[[0.5, 0.5], [-1.5, 0.5]]]), atol=1e-6)
    # per_thought: thought 0 all equal -> 0; thought 1 [0, 1]: mean .5, std .707 -> [-.707, +.707]
    assert torch.allclose(answer_advantages(r, "per_thought", 1e-12), torch.tensor([[[0.0, 0.0], [-s, s]]]),
                          atol=1e-6)


def test_equal_values_and_single_thought_give_zero():
    r = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # both thoughts have V = .5
    assert torch.equal(thought_advantages(r, 1e-6), torch.zeros(1, 2))
    assert torch.equal(thought_advantages(torch.ones(3, 1, 4), 1e-6), torch.zeros(3, 1))


def _layout(prompt_len, thought_lens, answer_lens, m, complete=None):
    """Rows thought-major; thought tokens trainable in the m = 0 row only. Returns (loss_mask, layout)."""
    n = len(answer_lens)
    width = prompt_len + max(thought_lens) + max(answer_lens)
    mask = torch.zeros(n, width, dtype=torch.bool)
    th = torch.tensor([thought_lens[i // m] for i in range(n)])
    for i in range(n):
        start = prompt_len if i % m == 0 else prompt_len + int(th[i])
        mask[i, start:prompt_len + int(th[i]) + answer_lens[i]] = True
    complete = torch.ones(n, dtype=torch.bool) if complete is None else torch.tensor(complete)
    layout = Layout(prompt_lengths=torch.full((n,), prompt_len), thought_tokens=th,
                    thought_rows=torch.arange(n) % m == 0, complete=complete)
    return mask, layout


def test_per_token_advantages_hand_values():
    """K = M = 2, thought lengths [4, 2], answer lengths [1, 2, 1, 3], rewards [1, 1, 0, 1]."""
    mask, layout = _layout(3, [4, 2], [1, 2, 1, 3], m=2)
    adv = per_token_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), mask, layout, 2, 2, "global", 1e-12)
    s = 1 / math.sqrt(2)
    th_mask, ans_mask = segment_masks(mask, layout)
    assert th_mask.sum(1).tolist() == [4, 0, 2, 0] and ans_mask.sum(1).tolist() == [1, 2, 1, 3]
    assert torch.allclose(adv[0, 3:7], torch.full((4,), s * 2 / 4))       # thought 0 in row 0: A^th M / |th|
    assert torch.allclose(adv[2, 3:5], torch.full((2,), -s * 2 / 2))      # thought 1 in row 2
    assert torch.allclose(adv[0, 7:8], torch.tensor([0.5]))                # answer: A^ans / |ans|
    assert torch.allclose(adv[1, 7:9], torch.full((2,), 0.5 / 2))
    assert torch.allclose(adv[2, 5:6], torch.tensor([-1.5]))
    assert torch.allclose(adv[3, 5:8], torch.full((3,), 0.5 / 3))
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))        # nothing outside the loss mask


def test_incomplete_thought_scores_zero():
    """A thought without its delimiter has no answers: its rows count as reward 0 whatever was scored."""
    mask, layout = _layout(2, [3, 3], [2, 2, 0, 0], m=2, complete=[True, True, False, False])
    adv = per_token_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), mask, layout, 2, 2, "global", 1e-12)
    # effective rewards [0, 1, 0, 0]: V = [.5, 0] -> thought 0 positive, thought 1 negative
    assert float(adv[0, 2]) > 0 and float(adv[2, 2]) < 0
    assert diagnostics(torch.tensor([0.0, 1.0, 1.0, 1.0]), layout, 2, 2, 1e-6)["grpo_ma/complete_frac"] == 0.5


def test_incomplete_thought_left_out_of_answer_normalisation_hand_values():
    """K = 3, M = 2, thought 2 never reaches the delimiter (its rows scored 1, which must not count).
    Thought values V = [.5, 1, 0] (the incomplete thought's value is 0): mean .5, unbiased std .5 ->
    A^th = [0, 1, -1]. Answers: only the 4 real ones [1, 0, 1, 1] are normalised (mean .75, std .5) ->
    A^ans = [.5, -1.5, .5, .5]; the incomplete thought's rows have no answer tokens and A^ans = 0.
    Per token (thought lengths [2, 3, 4], answer lengths [1, 2, 1, 1, 0, 0]): thought k's tokens in row
    k*M get A^th_k * M / |th_k|, answer tokens A^ans / |ans|."""
    mask, layout = _layout(2, [2, 3, 4], [1, 2, 1, 1, 0, 0], m=2, complete=[True] * 4 + [False] * 2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = per_token_advantages(rewards, mask, layout, 3, 2, "global", 1e-12)
    expected = torch.zeros(mask.shape)
    expected[0, 2:4] = 0.0 * 2 / 2                      # thought 0: A^th 0
    expected[0, 4:5] = 0.5                              # answer (0, 0)
    expected[1, 4:6] = -1.5 / 2                         # answer (0, 1), 2 tokens
    expected[2, 2:5] = 1.0 * 2 / 3                      # thought 1: A^th 1, 3 tokens
    expected[2, 5:6] = 0.5                              # answer (1, 0)
    expected[3, 5:6] = 0.5                              # answer (1, 1)
    expected[4, 2:6] = -1.0 * 2 / 4                     # thought 2 (incomplete): A^th -1, 4 tokens
    assert mask[5].sum() == 0 and mask[4].sum() == 4    # its rows hold the thought once, no answer
    assert torch.allclose(adv, expected, atol=1e-6), adv
    # per_thought scope: thought 0 [1, 0] -> [.707, -.707]; thought 1 equal -> 0; incomplete -> 0
    adv = per_token_advantages(rewards, mask, layout, 3, 2, "per_thought", 1e-12)
    s = 1 / math.sqrt(2)
    assert torch.allclose(adv[0, 4:5], torch.tensor([s])) and torch.allclose(adv[1, 4:6], torch.full((2,), -s / 2))
    assert torch.equal(adv[3], torch.zeros(mask.shape[1])) and torch.allclose(adv[4, 2:6], torch.full((4,), -0.5))


def test_answer_advantages_keep_mask():
    """The `keep` mask leaves answers out of the mean and std and gives them advantage 0; fewer than two
    kept answers in a set -> 0 (nothing to compare)."""
    r = torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[1.0, 0.0], [0.0, 0.0]]])  # [P=2, K=2, M=2]
    keep = torch.tensor([[[True, True], [False, False]], [[True, False], [False, False]]])
    s = 1 / math.sqrt(2)
    out = answer_advantages(r, "global", 1e-12, keep)
    assert torch.allclose(out, torch.tensor([[[s, -s], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]), atol=1e-6)


def _objective(logp, old, adv, mask, rows):
    loss, _ = ppo_clip(logp, old, adv, mask.float(), PPOClipLoss())
    return seq_mean_token_sum(loss, mask.float(), Normalisers.of(mask, 1), SeqMeanTokenSum())


def test_objective_equals_paper_form_values_and_gradient():
    """With seq_mean_token_sum, the per-token advantages give exactly
    J = (1/K) sum_k mean_t l(th_k) + (1/(KM)) sum_km mean_t l(ans_km), l_t = -min(r A, clip(r) A),
    in value and in gradient (ratios away from 1 so some tokens are clipped)."""
    torch.manual_seed(0)
    k, m = 2, 3
    mask, layout = _layout(2, [4, 3], [2, 1, 3, 2, 2, 1], m=m)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    adv = per_token_advantages(rewards, mask, layout, k, m, "global", 1e-6)
    old = torch.randn(mask.shape) * 0.1
    logp = (old + torch.randn(mask.shape) * 0.3).requires_grad_(True)
    ours = _objective(logp, old, adv, mask, k * m)
    (g_ours,) = torch.autograd.grad(ours, logp)

    r = rewards.reshape(1, k, m)
    a_th, a_ans = thought_advantages(r, 1e-6)[0], answer_advantages(r, "global", 1e-6)[0]
    th_mask, ans_mask = segment_masks(mask, layout)
    ratio = torch.exp(logp - old)

    def seg(row, seg_mask, a):
        sel = seg_mask[row]
        return -torch.minimum(ratio[row, sel] * a, ratio[row, sel].clamp(0.8, 1.28) * a).mean()

    ref = sum(seg(t * m, th_mask, a_th[t]) for t in range(k)) / k
    ref = ref + sum(seg(t * m + j, ans_mask, a_ans[t, j]) for t in range(k) for j in range(m)) / (k * m)
    (g_ref,) = torch.autograd.grad(ref, logp)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_gradient_routing_thought_masked_out():
    """§3.6 test 2: with the thought tokens out of the loss, their gradient is exactly zero even though the
    answers have non-zero advantages (thought and answer losses use disjoint token masks)."""
    mask, layout = _layout(2, [3, 3], [2, 2, 2, 2], m=2)
    adv = per_token_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), mask, layout, 2, 2, "global", 1e-6)
    th_mask, ans_mask = segment_masks(mask, layout)
    logp = torch.zeros(mask.shape, requires_grad=True)
    loss = _objective(logp, torch.zeros(mask.shape), adv, ans_mask, 4)
    (g,) = torch.autograd.grad(loss, logp)
    assert bool(adv[ans_mask].ne(0).any())
    assert torch.equal(g[th_mask], torch.zeros(int(th_mask.sum())))
    assert bool(g[ans_mask].ne(0).all())


def test_variance_of_thought_advantage_falls_as_one_over_m():
    """§3.6 test 3: Bernoulli rewards with fixed p_k; Var(A^th_1) over redraws shrinks roughly like 1/M."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.2, 0.4, 0.6, 0.8])
    var = {}
    for m in (1, 4, 16, 64):
        draws = (torch.rand(20000, 4, m, generator=gen) < p[None, :, None]).float()  # [S, K, M]
        var[m] = float(thought_advantages(draws, 1e-6)[:, 0].var())
    assert var[1] > var[4] > var[16] > var[64]
    # Var * M is flat once M is past the small-M regime, where the normalisation bounds |A| (M = 1: 0.46)
    scaled = [var[m] * m for m in (4, 16, 64)]
    assert max(scaled) / min(scaled) < 1.25, var


def test_m1_reduces_to_grpo_per_segment():
    """§3.6 test 4: with M = 1 the global answer advantage equals the thought advantage, both equal GRPO's
    advantage of the K responses, and the objective is GRPO's applied to each segment (thought, answer)."""
    from rl.config.algorithm import GRPOAdvantage
    from trainers.advantages import grpo

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    r = rewards.reshape(1, 5, 1)
    a_grpo = grpo(rewards, torch.zeros(5, dtype=torch.long), GRPOAdvantage(eps=1e-6))
    assert torch.allclose(thought_advantages(r, 1e-6)[0], a_grpo, atol=1e-6)
    assert torch.allclose(answer_advantages(r, "global", 1e-6)[0, :, 0], a_grpo, atol=1e-6)
    mask, layout = _layout(2, [3, 2, 4, 1, 2], [2, 1, 1, 3, 2], m=1)
    adv = per_token_advantages(rewards, mask, layout, 5, 1, "global", 1e-6)
    th_mask, ans_mask = segment_masks(mask, layout)
    expected = a_grpo[:, None] * (th_mask / th_mask.sum(1, keepdim=True) + ans_mask / ans_mask.sum(1, keepdim=True))
    assert torch.allclose(adv, expected, atol=1e-6)


def test_rows_must_be_whole_prompts():
    mask, layout = _layout(2, [3, 3], [2, 2, 2, 2], m=2)
    with pytest.raises(ValueError, match="whole prompts"):
        per_token_advantages(torch.zeros(4), mask, layout, 3, 2, "global", 1e-6)


def test_noise_variance_diagnostic_hand_value():
    """Var(V_k) = s_k^2/M averaged over thoughts, over Var_k(V): rewards [[1,0],[1,1]] -> s^2 = [.5, 0],
    noise = (.25 + 0)/2 = .125; V = [.5, 1], Var_k V = .125 -> 1.0."""
    _, layout = _layout(2, [1, 1], [1, 1, 1, 1], m=2)
    d = diagnostics(torch.tensor([1.0, 0.0, 1.0, 1.0]), layout, 2, 2, 1e-9)
    assert d["grpo_ma/thought_adv_noise_var"] == pytest.approx(1.0)
    assert d["grpo_ma/thought_value_std"] == pytest.approx(math.sqrt(0.125))
