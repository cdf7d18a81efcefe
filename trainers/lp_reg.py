"""Lp-Reg: low-probability regularisation (Huang et al., arXiv 2510.03222; reference code CarlanLark/Lp-Reg-dev,
`core_algos.py::compute_policy_loss_lp_reg`, `dp_actor.py::apply_min_p`). ALGORITHMS.md §6.

RLVR's negative-advantage updates push rare but useful tokens ("reasoning sparks": "wait", "alternatively")
towards zero and entropy collapses. Lp-Reg builds a *proxy* of the old policy with presumed-noise tokens
removed (min-p filter: p_v < kappa * max_u p_u) and renormalised, so the surviving low-probability tokens get
*more* mass, and on the bottom-rho fraction (by current probability) of negative-advantage tokens whose
probability is below the proxy's it replaces the clipped surrogate by

    L_t = -A_t r_t + beta * k3(pi_proxy(y_t) / pi(y_t)),     k3(x) = x - log x - 1, clamped to [-10, 10]

whose gradient w.r.t. log pi(y_t) is -A_t r_t + beta (1 - pi_proxy/pi) < -A_t r_t: the push-down is softened.

Worked example (§6.7 test 1): p = [0.6, 0.3, 0.09, 0.01], kappa = 0.02 -> threshold 0.012 removes token 3;
the proxy is [0.6, 0.3, 0.09] / 0.99 and token 3's proxy log-prob is about -1e4 (it is never protected,
since log pi(y) < proxy_logp fails).

Departures from the reference, both deliberate:
- The proxy is computed in the trainer from the policy *before* this batch's updates (π_old, the released
  scripts' `minp_old_log_prob=True`), chunked over loss positions so at most one [chunk, V] fp32 block is
  alive; only the sampled token's proxy log-prob is kept ([N, T], like a logprob).
- Token selection (the top-k lowest log-probs among negative tokens) is done per micro-batch, as in the
  reference (verl's micro-batch); here the micro-batch is `trainer.micro_batch_tokens`' packing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.registries import LOSSES
from rl.types import LossContext, Objective, Stats
from trainers.logprobs import backbone_and_head, loss_positions
from trainers.losses import _clip_stats, clipped_surrogate, kl_k3, masked_mean
from trainers.microbatch import no_grad_logprobs

if TYPE_CHECKING:
    from rl.config.algorithm import LpRegLoss

FILTERED_LOGIT = -1e4  # the reference's hard-filter value: exp(-1e4 - logZ) is exactly 0 in fp32


def proxy_logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, threshold: float, mode: str = "min_p",
                               temperature: float = 1.0, soft: bool = False) -> torch.Tensor:
    """[K] log pi_proxy(target) from full-vocab `logits [K, V]` (ALGORITHMS.md §6.2).

    keep_v = p_v >= threshold * max_u p_u (`min_p`) or p_v >= threshold (`fixed`), with p the temperature-1
    softmax; filtered logits become -1e4 (`soft`: the row's smallest logit), then softmax(z' / temperature).
    """
    z = logits.float()  # [K, V]
    logp1 = torch.log_softmax(z, dim=-1)  # [K, V], temperature-1 probabilities decide what is noise
    if mode == "min_p":
        keep = logp1 >= logp1.max(dim=-1, keepdim=True).values + math.log(threshold)  # p >= kappa * p_max
    else:
        keep = logp1 >= math.log(threshold)
    fill = z.min(dim=-1, keepdim=True).values.expand_as(z) if soft else torch.full_like(z, FILTERED_LOGIT)
    proxy = torch.log_softmax(torch.where(keep, z, fill) / temperature, dim=-1)  # [K, V]
    return proxy.gather(1, targets.unsqueeze(1)).squeeze(1)  # [K]


@torch.no_grad()
def proxy_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         loss_mask: torch.Tensor, cfg: LpRegLoss, temperature: float = 1.0,
                         chunk_tokens: int = 1024) -> torch.Tensor:
    """[B, T] log pi_proxy of each loss token (aligned like `token_logprobs`), 0 elsewhere. No grad: the
    proxy is a fixed target. Only loss positions reach the LM head, `chunk_tokens` at a time."""
    decoder, head = backbone_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).last_hidden_state
    rows, cols = loss_positions(loss_mask)
    selected, targets = hidden[rows, cols], input_ids[rows, cols + 1]  # [K, H], [K]
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    parts = [proxy_logprobs_from_logits(head(selected[s:s + chunk_tokens]), targets[s:s + chunk_tokens],
                                        cfg.min_p if cfg.proxy == "min_p" else cfg.fixed_threshold, cfg.proxy,
                                        temperature, cfg.soft_filter)
             for s in range(0, selected.shape[0], chunk_tokens)]
    return out.index_put((rows, cols + 1), torch.cat(parts)) if parts else out


def select_lowest(logp: torch.Tensor, candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, T] bool: the k = max(1, int(n * fraction)) candidates with the lowest `logp`, or none when k <= 1
    (the reference's `if k > 1`: with rho = 1% fewer than 200 candidates select nothing)."""
    n = int(candidates.sum())
    k = max(1, int(n * fraction))
    chosen = torch.zeros_like(candidates)
    if k <= 1:
        return chosen
    flat = torch.nonzero(candidates.flatten()).squeeze(1)  # [n]
    lowest = flat[logp.detach().flatten()[flat].topk(k, largest=False).indices]  # [k]
    return chosen.flatten().index_fill(0, lowest, True).view_as(candidates)


def lp_reg_objective(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                     cfg: LpRegLoss, proxy_logp: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Per-token Lp-Reg loss [B, T] (ALGORITHMS.md §6.3). `proxy_logp [B, T]`: log pi_proxy(y_t), no grad.

    Base: the clipped surrogate. Selected tokens S' = (lowest-logp rho_neg of A < 0 tokens, plus rho_pos of
    A > 0 tokens, each chosen only if k > 1) with log pi(y) < proxy_logp get -A r + beta * k3 instead.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    loss = clipped_surrogate(ratio, adv, cfg.clip_low, cfg.clip_high)  # [B, T]
    valid = mask > 0
    selected = select_lowest(logp, valid & (adv < 0), cfg.neg_fraction)
    selected |= select_lowest(logp, valid & (adv > 0), cfg.pos_fraction)
    protected = selected & (logp.detach() < proxy_logp)  # [B, T]; filtered tokens (proxy ~ -1e4) never pass
    kl = kl_k3(logp, proxy_logp)  # [B, T], k3 of pi_proxy / pi as verl's low_var_kl
    loss = torch.where(protected, -adv * ratio + cfg.coef * kl, loss)
    stats = _clip_stats(ratio, adv, mask, cfg.clip_low, cfg.clip_high)
    stats.update({"lp_reg/protected_frac": masked_mean(protected.float(), mask),
                  "lp_reg/selected_frac": masked_mean(selected.float(), mask),
                  "lp_reg/proxy_kl": (kl.detach() * protected).sum() / protected.sum().clamp(min=1)})
    return loss, stats


def prepare_lp_reg(ctx: LossContext, mini: RolloutBatch, cfg: LpRegLoss) -> dict[str, torch.Tensor]:
    """The loss's extra input for a mini-batch, computed before any update of the step (pi_old):
    {"proxy_logp": [n, T]}, micro-batch by micro-batch without grad."""

    def compute(micro: RolloutBatch) -> torch.Tensor:
        to = lambda t: t.to(ctx.device)  # noqa: E731
        return ctx.apply(lambda policy: proxy_token_logprobs(
            policy, to(micro.input_ids), to(micro.attention_mask), to(micro.loss_mask), cfg, ctx.temperature,
            ctx.logprob_chunk_tokens))

    return {"proxy_logp": no_grad_logprobs(compute, mini, ctx.micro_batch_tokens)}


def lp_reg(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, cfg: LpRegLoss,
           proxy_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """Lp-Reg (arXiv 2510.03222): see `lp_reg_objective`. The trainer supplies `proxy_logp` via `prepare`."""
    if proxy_logp is None:
        raise ValueError("the lp_reg loss needs proxy_logp (computed by its `prepare` hook in the trainer)")
    return lp_reg_objective(logp, old_logp, adv, mask, cfg, proxy_logp)



LOSSES.register("lp_reg")(Objective(lp_reg, prepare=prepare_lp_reg))  # prepare: once per mini-batch, before updating
