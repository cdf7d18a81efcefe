"""RAPID: large-batch inference, then off-policy group policy-gradient updates on mini-batches of it
(Huang, Anupam, Lee, Li, Bastani; arXiv 2510.03515). ALGORITHMS.md §8.

The loop is the trainer's: a step generates `prompts_per_step` prompts (the large inference batch), and
`trainer.mini_batches` = H optimizer updates run on shards of whole groups. The behaviour policy pi_b is the
policy that generated the batch; its log-probs are recomputed once per step before any update (the trainer's
`old` logprobs) or, with `behaviour_logprobs: sampler`, taken from the sampler (exact when the sampler is the
learner's own model, the `hf` backend). Only the first mini-batch is on-policy.

Estimator (group relative policy gradient with importance weights; §8.2):
    w_i   = min(pi(y_i|x) / pi_b(y_i|x), eta)                    sequence-level, detached, eta = 2.0
    b_i   = (1/(G-1)) sum_{j != i} w_j R_j       (`leave_one_out`, default: the IS estimate of V(x) = E_pi[R]
                                                 from the other members; exactly unbiased before clipping)
          | (1/G) sum_j w_j R_j                 (`weighted_mean`: holds the sample's own w_i R_i, so off
                                                 policy its w_i^2 R_i term biases the gradient)
          | sum_j w_j R_j / sum_j w_j           (`self_normalised`)
    A_i   = w_i (R_i - b_i) [/ (std_j R_j + eps) with `scale_by_std`]
    L_t   = -sg[A_i] log pi(y_{i,t})            gradient = -(1/...) sum_i A_i grad log pi(y_i)
[INFERRED]: the paper's text was not available here (only its abstract and reviews: "importance weights
clipped at 2.0", "an additional IS term in the value estimation"); the forms above are the natural
derivation of those statements and are options; the default is the one that is unbiased (the paper's
stated property; tests/unit/trainers/test_rapid.py checks it on a bandit). Worked example: rewards [1, 0],
w = [3, 1] -> used w = [2, 1]; leave_one_out b = [1 * 0, 2 * 1] = [0, 2], A = [2 * (1 - 0), 1 * (0 - 2)] = [2, -2];
weighted_mean b = (2 * 1 + 1 * 0) / 2 = 1, A = [0, -1].

Groups must be whole inside a micro-batch (the baseline needs every member's weight under the current
policy, from the same forward pass): `needs_whole_groups` tells the trainer to pack by groups.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.registries import LOSSES
from rl.types import LossContext, Objective, Stats
from trainers.advantages import _group_index
from trainers.losses import MAX_LOG_SEQUENCE_RATIO, _clip_stats, masked_mean

if TYPE_CHECKING:
    from rl.config.algorithm import RapidLoss


def clipped_sequence_weights(logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                             eta: float) -> torch.Tensor:
    """[B] min(prod_t pi(y_t) / pi_b(y_t), eta), computed in log space (clamped before exp), detached."""
    log_w = ((logp.detach() - behaviour_logp) * mask).sum(1)  # [B]
    return torch.exp(log_w.clamp(max=min(math.log(eta), MAX_LOG_SEQUENCE_RATIO)))


def _group_sum(x: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """[B] the sum of `x [B]` over each row's group."""
    return torch.zeros(groups, dtype=x.dtype).scatter_add_(0, index, x)[index]


def weighted_group_advantage(rewards: torch.Tensor, weights: torch.Tensor, group_ids: torch.Tensor,
                             cfg: RapidLoss) -> torch.Tensor:
    """[B] A_i = w_i (R_i - b_i) with the IS-weighted group baseline `cfg.baseline` (module docstring)."""
    index, groups = _group_index(group_ids)
    r, w = rewards.double(), weights.double()
    size = _group_sum(torch.ones_like(r), index, groups)
    weighted = _group_sum(w * r, index, groups)
    if cfg.baseline == "weighted_mean":
        base = weighted / size
    elif cfg.baseline == "self_normalised":
        base = weighted / _group_sum(w, index, groups)
    else:  # leave_one_out; a group of one has no other member: baseline 0
        base = torch.where(size > 1, (weighted - w * r) / (size - 1).clamp(min=1), torch.zeros_like(r))
    adv = w * (r - base)
    if cfg.scale_by_std:
        mean = _group_sum(r, index, groups) / size
        var = _group_sum((r - mean) ** 2, index, groups) / (size - 1).clamp(min=1)
        adv = adv / (torch.where(size > 1, var.sqrt(), torch.ones_like(var)) + cfg.eps)
    return adv.float()


def rapid_objective(logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                    group_ids: torch.Tensor, cfg: RapidLoss) -> tuple[torch.Tensor, Stats]:
    """Per-token RAPID loss [B, T] = -sg[A_i] log pi(y_t); rows hold whole groups. rewards, group_ids: [B]."""
    w = clipped_sequence_weights(logp, behaviour_logp, mask, cfg.eta)  # [B]
    adv = weighted_group_advantage(rewards, w, group_ids, cfg).to(logp.device)  # [B]
    loss = -adv.unsqueeze(1) * logp  # [B, T]
    raw = torch.exp(((logp.detach() - behaviour_logp) * mask).sum(1).clamp(max=MAX_LOG_SEQUENCE_RATIO))  # [B]
    stats = _clip_stats(raw.unsqueeze(1).expand_as(logp), adv.unsqueeze(1).expand_as(logp), mask, math.inf, math.inf)
    seq_mask = (mask.sum(1) > 0).float()  # [B]
    stats.update({"rapid/weight_mean": masked_mean(w, seq_mask),
                  "rapid/weight_clipped_frac": masked_mean((raw > cfg.eta).float(), seq_mask),
                  "rapid/ess_frac": effective_sample_fraction(w, seq_mask)})
    return loss, stats


def effective_sample_fraction(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (n sum w^2) over the `rows` [B] holding tokens: 1 if all weights agree, 1/n if one dominates."""
    return (w * rows).sum() ** 2 / ((w ** 2 * rows).sum() * rows.sum()).clamp(min=1e-12)


def prepare_rapid(ctx: LossContext, mini: RolloutBatch, cfg: RapidLoss) -> dict[str, torch.Tensor]:
    """Row-aligned extra inputs of a mini-batch: rewards and group ids [n], and the sampler's log-probs
    [n, T] when they stand for pi_b. (Nothing to compute: `ctx` is not needed.)"""
    if mini.rewards is None:
        raise ValueError("the rapid loss needs a batch with rewards")
    extra = {"rewards": mini.rewards, "group_ids": mini.group_ids}
    if cfg.behaviour_logprobs == "sampler":
        extra["behaviour_logp"] = mini.sampling_logprobs
    return extra


def rapid(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, cfg: RapidLoss,
          rewards: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
          behaviour_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """RAPID's importance-weighted group policy gradient (arXiv 2510.03515). `adv` is not used: the
    advantage depends on the current weights and is recomputed here from `rewards` (see module docstring)."""
    if rewards is None or group_ids is None:
        raise ValueError("the rapid loss needs rewards and group_ids (supplied by its `prepare` hook)")
    return rapid_objective(logp, old_logp if behaviour_logp is None else behaviour_logp, mask, rewards, group_ids, cfg)



def _needs_learner_behaviour(cfg: RapidLoss) -> bool:
    """With the sampler's log-probs as pi_b the trainer's recomputation of old logprobs is skipped."""
    return cfg.behaviour_logprobs == "learner"


LOSSES.register("rapid")(Objective(rapid, prepare=prepare_rapid, needs_whole_groups=True,
                                   needs_old_logprobs=_needs_learner_behaviour))
