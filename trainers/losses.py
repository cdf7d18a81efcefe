"""Per-token policy objectives, KL estimators and sampler/learner importance weights.

Objectives are pure functions `fn(logp, old_logp, adv, mask, cfg) -> (loss [B, T], stats)`:
    logp      [B, T]  learner logprobs of the sampled tokens (with grad)
    old_logp  [B, T]  logprobs of the policy that generated the data (no grad)
    adv       [B, T]  advantages broadcast to tokens
    mask      [B, T]  float, 1 on loss tokens
They return the *per-token* loss; aggregation (rl/trainers/aggregation.py) is separate.
"""

from __future__ import annotations

from typing import Any

import torch

from rl.registries import LOSSES

Stats = dict[str, torch.Tensor]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _clip_stats(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> Stats:
    clipped_low = ((ratio < 1 - low) & (adv < 0)).float()  # gradient stopped on the low side
    clipped_high = ((ratio > 1 + high) & (adv > 0)).float()
    big = torch.where(mask > 0, ratio.detach(), torch.zeros_like(ratio))
    return {"clip_frac_low": _masked_mean(clipped_low, mask), "clip_frac_high": _masked_mean(clipped_high, mask),
            "ratio_mean": _masked_mean(ratio.detach(), mask), "ratio_max": big.max()}


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """-min(r A, clip(r, 1-low, 1+high) A), per element."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))


@LOSSES.register("ppo_clip")
def ppo_clip(logp, old_logp, adv, mask, cfg: Any) -> tuple[torch.Tensor, Stats]:
    """GRPO's clipped surrogate (DeepSeekMath, arXiv 2402.03300) with DAPO's decoupled clip range
    (clip-higher, arXiv 2503.14476): L = -min(r A, clip(r, 1-eps_low, 1+eps_high) A), r = pi/pi_old."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    return clipped_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high), _clip_stats(
        ratio, adv, mask, cfg.clip_low, cfg.clip_high)


def sequence_log_ratio(logp, old_logp, mask) -> torch.Tensor:
    """[B, 1] (1/|y_i|) sum_t (log pi - log pi_old): the log of GSPO's length-normalised ratio s_i."""
    return ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


@LOSSES.register("gspo")
def gspo(logp, old_logp, adv, mask, cfg: Any) -> tuple[torch.Tensor, Stats]:
    """GSPO (arXiv 2507.18071, eq. 5-7): s_i = (pi(y_i)/pi_old(y_i))^(1/|y_i|), clipped per sequence:
    L_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i), broadcast to the sequence's tokens
    (aggregate with seq_mean_token_mean for the paper's objective). A_i: the sequence's advantage."""
    seq_adv = (adv * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    s = torch.exp(sequence_log_ratio(logp, old_logp, mask))  # [B, 1]
    loss = clipped_surrogate(s, seq_adv, cfg.clip_low, cfg.clip_high).expand_as(logp)  # [B, T]
    return loss, _clip_stats(s.expand_as(logp), seq_adv.expand_as(logp), mask, cfg.clip_low, cfg.clip_high)


@LOSSES.register("gspo_token")
def gspo_token(logp, old_logp, adv, mask, cfg: Any) -> tuple[torch.Tensor, Stats]:
    """GSPO-token (arXiv 2507.18071, eq. 13): s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], so every token
    has the value s_i but its own gradient and advantage; equals GSPO when A is constant per sequence."""
    log_s = sequence_log_ratio(logp, old_logp, mask).detach()  # [B, 1]
    ratio = torch.exp(log_s + logp - logp.detach())  # [B, T], value s_i
    return clipped_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high), _clip_stats(
        ratio, adv, mask, cfg.clip_low, cfg.clip_high)


@LOSSES.register("reinforce")
def reinforce(logp, old_logp, adv, mask, cfg: Any) -> tuple[torch.Tensor, Stats]:
    """Plain policy gradient L = -A log pi (ratio fixed at 1; gradient -A grad log pi)."""
    ones = torch.ones_like(logp)
    return -adv * logp, {"clip_frac_low": torch.zeros(()), "clip_frac_high": torch.zeros(()),
                         "ratio_mean": ones.mean(), "ratio_max": ones.max()}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """[B, T] per-token KL(pi || pi_ref) estimate at sampled tokens (Schulman's k1/k3).

    k1 = log pi - log pi_ref;  k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0 (DeepSeekMath), clamped to
    [-10, 10] as in verl; its gradient w.r.t. log pi is 1 - pi_ref/pi.
    """
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)


def mismatch_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, level: str,
                     cap: float) -> torch.Tensor:
    """[B, T] truncated importance weights min(pi_learner_old / pi_sampler, cap) (TIS) correcting for
    the sampler (e.g. vLLM) computing slightly different probabilities than the learner; token or
    sequence level (product over the sequence's tokens). No gradient flows through them."""
    log_w = (old_logp - sampling_logp) * mask  # [B, T]
    if level == "sequence":
        log_w = log_w.sum(1, keepdim=True).expand_as(old_logp)
    return torch.exp(log_w.clamp(max=torch.log(torch.tensor(cap)).item())).detach()


def mismatch_kl(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over loss tokens of the k3 estimate of KL(sampler || learner): r - log r - 1, r = pi_l/pi_s."""
    log_r = (old_logp - sampling_logp).clamp(-20, 20)
    return _masked_mean(torch.exp(log_r) - log_r - 1, mask)
