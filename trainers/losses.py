"""Per-token policy objectives, KL estimators and sampler/learner importance weights.

Objectives are pure functions `fn(logp, old_logp, adv, mask, cfg) -> (loss [B, T], stats)`, each registered
as an `rl.types.Objective` (`LOSSES.register(name)(Objective(fn, ...))`, the one way to add a loss):
    logp      [B, T]  learner logprobs of the sampled tokens (with grad)
    old_logp  [B, T]  logprobs of the policy that generated the data (no grad)
    adv       [B, T]  advantages broadcast to tokens
    mask      [B, T]  float, 1 on loss tokens
They return the *per-token* loss (the quantity to minimise); how it becomes a scalar is the
aggregation's job (trainers/aggregation.py). Values at mask 0 are arbitrary and must be masked.
Stats (0-dim tensors, no grad): clip_frac_low, clip_frac_high (fractions of loss tokens whose
gradient the clip removed), ratio_mean (over loss tokens), ratio_max.

Worked example (ppo_clip, eps_low = 0.2, eps_high = 0.28), one token with A = +1:
    r = 1.50 -> loss -1.28 (clipped: zero gradient);   r = 0.50 -> loss -0.50 (unclipped)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rl.registries import LOSSES
from rl.types import Objective, Stats

if TYPE_CHECKING:
    from rl.config.algorithm import GSPOLoss, GSPOTokenLoss, PPOClipLoss, ReinforceLoss

__all__ = ["Stats", "gspo", "gspo_token", "ppo_clip", "reinforce"]  # Stats: re-exported from rl.types

# GSPO reference code (verl core_algos.compute_policy_loss_gspo) clamps log s <= 10 before exp:
# a sequence ratio of e^10 is already far outside any clip range, and exp would overflow in bf16.
MAX_LOG_SEQUENCE_RATIO = 10.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _clip_stats(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> Stats:
    ratio = ratio.detach()
    clipped_low = ((ratio < 1 - low) & (adv < 0)).float()  # the min picks the constant clipped branch
    clipped_high = ((ratio > 1 + high) & (adv > 0)).float()
    largest = torch.where(mask > 0, ratio, torch.zeros_like(ratio))
    return {"clip_frac_low": masked_mean(clipped_low, mask), "clip_frac_high": masked_mean(clipped_high, mask),
            "ratio_mean": masked_mean(ratio, mask), "ratio_max": largest.max()}


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """-min(r A, clip(r, 1-low, 1+high) A), elementwise (verl writes it as max(-A r, -A clip(r)))."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))


def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
             cfg: PPOClipLoss) -> tuple[torch.Tensor, Stats]:
    """GRPO's clipped surrogate (DeepSeekMath, arXiv 2402.03300, eq. 3) with DAPO's decoupled clip range
    (clip-higher, arXiv 2503.14476, eq. 10): L_t = -min(r_t A_t, clip(r_t, 1-eps_low, 1+eps_high) A_t),
    r_t = pi(y_t) / pi_old(y_t)."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    loss = clipped_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high)  # [B, T]
    return loss, _clip_stats(ratio, adv, mask, cfg.clip_low, cfg.clip_high)


LOSSES.register("ppo_clip")(Objective(ppo_clip))


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] (1/|y_i|) sum_t m (log pi - log pi_old): log of GSPO's length-normalised ratio s_i.
    Padding never enters (masked); an empty sequence has |y| clamped to 1 and ratio 1."""
    return ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


def sequence_advantage(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] the mean advantage over a sequence's loss tokens (= A_i for outcome rewards)."""
    return (adv * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


def gspo(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
         cfg: GSPOLoss) -> tuple[torch.Tensor, Stats]:
    """GSPO (Zheng et al., arXiv 2507.18071, eq. 5-7): s_i = (pi(y_i)/pi_old(y_i))^(1/|y_i|), clipped per
    sequence, L_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i), broadcast to the sequence's tokens.

    The gradient of the unclipped branch is -A_i s_i (1/|y_i|) sum_t grad log pi(y_t): every token of a
    sequence gets the same weight, and a clipped sequence gets none. The paper's objective is this
    aggregated with `seq_mean_token_mean` (the per-token values are constant within a sequence).
    """
    seq_adv = sequence_advantage(adv, mask)  # [B, 1]
    log_s = sequence_log_ratio(logp, old_logp, mask).clamp(max=MAX_LOG_SEQUENCE_RATIO)  # [B, 1]
    s = torch.exp(log_s)  # [B, 1]
    loss = clipped_surrogate(s, seq_adv, cfg.clip_low, cfg.clip_high).expand_as(logp)  # [B, T]
    return loss, _clip_stats(s.expand_as(logp), seq_adv.expand_as(logp), mask, cfg.clip_low, cfg.clip_high)


LOSSES.register("gspo")(Objective(gspo))


def gspo_token(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
               cfg: GSPOTokenLoss) -> tuple[torch.Tensor, Stats]:
    """GSPO-token (arXiv 2507.18071, eq. 13-14): s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], in log space as
    the reference code does. Every token has the value s_i (sequence-level clipping decision) but its own
    gradient s_i grad log pi(y_t) and its own advantage A_{i,t}; equals GSPO when A is constant per sequence."""
    log_s = sequence_log_ratio(logp, old_logp, mask).detach()  # [B, 1]
    log_ratio = (log_s + logp - logp.detach()).clamp(max=MAX_LOG_SEQUENCE_RATIO)  # [B, T], value log s_i
    ratio = torch.exp(log_ratio)
    loss = clipped_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high)  # [B, T]
    return loss, _clip_stats(ratio, adv, mask, cfg.clip_low, cfg.clip_high)


LOSSES.register("gspo_token")(Objective(gspo_token))


def reinforce(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              cfg: ReinforceLoss) -> tuple[torch.Tensor, Stats]:
    """Plain policy gradient (Williams 1992): L_t = -A_t log pi(y_t), gradient -A_t grad log pi(y_t).
    The ratio is taken as 1 (on-policy); reported ratio stats are those of pi/pi_old for monitoring."""
    ratio = torch.exp(logp.detach() - old_logp)  # [B, T]
    stats = _clip_stats(ratio, adv, mask, math.inf, math.inf)  # nothing is ever clipped
    return -adv * logp, stats


LOSSES.register("reinforce")(Objective(reinforce))


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref (Schulman 2020, 'Approximating KL divergence'): unbiased, high variance."""
    return logp - ref_logp  # [B, T]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0 (DeepSeekMath eq. 4; verl `low_var_kl`), clamped to
    [-10, 10] as verl does. Gradient w.r.t. log pi: 1 - pi_ref/pi (zero where pi = pi_ref)."""
    log_ratio = (ref_logp - logp).clamp(-20, 20)  # exp of a larger log-ratio overflows fp32's usefulness
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)  # [B, T]


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """[B, T] per-token estimate of KL(pi || pi_ref) at the sampled tokens, added to the per-token loss
    as beta * k (loss form, ALGORITHMS.md §1.2). `estimator`: a key of KL_ESTIMATORS."""
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def mismatch_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, level: str,
                     cap: float) -> torch.Tensor:
    """[B, T] truncated importance weights min(pi_learner_old / pi_sampler, cap) (TIS: Yao et al. 2025,
    'Your efficient RL framework secretly brings you off-policy RL training'; verl `tis_imp_ratio_cap`).

    They multiply the per-token loss to correct for the sampler (e.g. vLLM) assigning slightly different
    probabilities than the learner. `token`: one weight per token; `sequence`: the product over the
    sequence's loss tokens, shared by all of them. `none`: all ones. No gradient flows through them.
    """
    if level == "none":
        return torch.ones_like(old_logp)
    log_w = ((old_logp - sampling_logp) * mask).detach()  # [B, T]
    if level == "sequence":
        log_w = log_w.sum(1, keepdim=True).expand_as(old_logp)  # [B, T], the sequence's log weight
    return torch.exp(log_w.clamp(max=math.log(cap)))


def mismatch_kl(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The `policy/mismatch_kl` metric: mean over loss tokens of the k3 estimate of KL(sampler || learner),
    r - log r - 1 with r = pi_learner_old / pi_sampler (>= 0; 0 iff the two agree on every sampled token).
    Samples come from the sampler, so E[r] = 1 and E[-log r] = KL(sampler || learner)."""
    log_r = (old_logp - sampling_logp).detach().clamp(-20, 20)  # [B, T]
    return masked_mean(torch.exp(log_r) - log_r - 1, mask)
