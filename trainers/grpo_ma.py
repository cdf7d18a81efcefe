"""GRPO-MA advantages (Wang et al., "GRPO-MA: Multi-Answer Generation in GRPO for Stable and Efficient
Chain-of-Thought Training", arXiv 2509.24494). Pure functions over tensors.

For one prompt with K thoughts th_k and M answers ans_{k,m} per thought, rewards R_{k,m}:
    V_k        = (1/M) sum_m R_{k,m}                                  the thought's value
    A^th_k     = (V_k - mean_k V) / (std_k V + eps)                   normalised over the K thoughts
    A^ans_{k,m} = (R_{k,m} - mean R) / (std R + eps)                  over all K*M answers (`global`), or
                = (R_{k,m} - V_k) / (std_m R_{k,.} + eps)             within the thought (`per_thought`)
    J = (1/K) sum_k J_clip(th_k; A^th_k) + (1/(K M)) sum_{k,m} J_clip(ans_{k,m} | th_k; A^ans_{k,m})
with J_clip the GRPO clipped surrogate averaged over the segment's tokens. std is Bessel-corrected, as in
trainers/advantages.py; a set of one (K = 1, or M = 1 per thought) has advantage 0 (nothing to compare).
The paper's text confirms K thoughts, M answers each, the thought advantage from the mean answer reward
normalised over thoughts, and separate answer advantages; the answer scope is ALGORITHMS.md §3.2's
reconstruction (`global` default, `per_thought` switch).

A thought that never reaches its delimiter (EOS or the token budget) has no answers (ALGORITHMS.md §3.5;
the paper does not treat the case). Its value is V_k = 0 -- it earned no reward -- and it stays in the thought
normalisation, so its tokens are pushed down relative to thoughts that do answer. Its M rows carry no answer
tokens and are left out of the answer normalisation (A^ans = 0 for them): counting them as M zero-reward
answers would lower the baseline that real answers are compared against. Worked example, K = 3, M = 2,
thought 2 incomplete, real answer rewards [[1, 0], [1, 1]]: V = [.5, 1, 0] -> A^th = [0, 1, -1];
A^ans = [[.5, -1.5], [.5, .5], [0, 0]] (mean .75 and std .5 over the 4 real answers only).

The objective is realised with the trainer's per-token loss and the `seq_mean_token_sum` aggregation
(sum over a row's loss tokens, mean over the B = P*K*M rows) by folding the segment means into per-token
advantages: each thought appears once in the loss (its first row; rollout/multi_answer.py masks the
copies), so its tokens get A^th_k * M / |th_k|, and answer tokens get A^ans_{k,m} / |ans_{k,m}|:
    (1/(P K M)) sum [M/|th| sum_t l_t + 1/|ans| sum_t l_t] = (1/P) sum_prompts J   (l_t positively
homogeneous in A, which holds for ppo_clip and reinforce; the clip decisions do not change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def normalise(x: torch.Tensor, eps: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / (unbiased std + eps) over the last dim, taken over the `keep` entries only (all when None);
    0 on the others and wherever fewer than two entries are kept. x, keep: [..., S]."""
    keep = torch.ones_like(x, dtype=torch.bool) if keep is None else keep
    count = keep.sum(-1, keepdim=True)  # [..., 1]
    mean = torch.where(keep, x, 0).sum(-1, keepdim=True) / count.clamp(min=1)
    dev = torch.where(keep, x - mean, 0)  # [..., S]
    std = (dev.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    return torch.where(keep & (count >= 2), dev / (std + eps), 0)


def thought_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """rewards [P, K, M] -> A^th [P, K]: each thought's mean answer reward, normalised over the K thoughts."""
    return normalise(rewards.double().mean(-1), eps).float()


def answer_advantages(rewards: torch.Tensor, scope: str, eps: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [P, K, M] -> A^ans [P, K, M], normalised over the prompt's K*M answers or each thought's M;
    keep [P, K, M] bool (None: all) marks the real answers -- the others get 0 and do not enter the mean/std."""
    r = rewards.double()
    if scope == "global":
        p, k, m = r.shape
        flat_keep = None if keep is None else keep.reshape(p, k * m)
        return normalise(r.reshape(p, k * m), eps, flat_keep).reshape(p, k, m).float()
    if scope == "per_thought":
        return normalise(r, eps, keep).float()
    raise ValueError(f"answer_adv_scope must be 'global' or 'per_thought', not {scope!r}")


@dataclass(frozen=True)
class Layout:
    """Where each row's segments lie. Rows are thought-major per prompt (row p*K*M + k*M + m).

    prompt_lengths [N] long; thought_tokens [N] long (|th_k|, the same for the M rows of a thought);
    thought_rows [N] bool (True on the row whose loss_mask holds the thought, m = 0);
    complete [N] bool (the thought reached its delimiter; rows of incomplete thoughts score 0).
    """

    prompt_lengths: torch.Tensor
    thought_tokens: torch.Tensor
    thought_rows: torch.Tensor
    complete: torch.Tensor


def segment_masks(loss_mask: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(thought_mask, answer_mask), each [N, T] bool, partitioning loss_mask [N, T]."""
    pos = torch.arange(loss_mask.shape[1]).unsqueeze(0)  # [1, T]
    start = layout.prompt_lengths.unsqueeze(1)  # [N, 1]
    in_thought = (pos >= start) & (pos < start + layout.thought_tokens.unsqueeze(1))  # [N, T]
    return loss_mask & in_thought, loss_mask & ~in_thought


def per_token_advantages(rewards: torch.Tensor, loss_mask: torch.Tensor, layout: Layout, thoughts: int,
                         answers: int, scope: str, eps: float) -> torch.Tensor:
    """rewards [N] (N = P*K*M, thought-major), loss_mask [N, T] -> advantages [N, T].

    Thought tokens: A^th_k * M / |th_k|; answer tokens: A^ans_{k,m} / |ans_{k,m}|; 0 elsewhere. An incomplete
    thought has value 0 and its rows are left out of the answer normalisation (module docstring).

    Example, K = M = 2, rewards [1, 1, 0, 1] (thought 0: both right): V = [1, .5], A^th = [.707, -.707];
    global A^ans = [.5, .5, -1.5, .5]. A 4-token thought 0 gets .707 * 2/4 on each token of row 0.
    """
    n = rewards.shape[0]
    p = n // (thoughts * answers)
    if p * thoughts * answers != n:
        raise ValueError(f"grpo_ma: {n} rows are not whole prompts of K*M = {thoughts}*{answers} rows")
    r = torch.where(layout.complete, rewards.float(), torch.zeros_like(rewards.float()))
    r = r.reshape(p, thoughts, answers)
    a_th = thought_advantages(r, eps).repeat_interleave(answers, dim=1).reshape(n)  # [N]
    a_ans = answer_advantages(r, scope, eps, layout.complete.reshape(p, thoughts, answers)).reshape(n)  # [N]
    th_mask, ans_mask = segment_masks(loss_mask, layout)  # [N, T] each
    th_w = answers / layout.thought_tokens.clamp(min=1).float()  # [N]
    ans_w = 1.0 / ans_mask.sum(1).clamp(min=1).float()  # [N]
    return (th_mask * (a_th * th_w).unsqueeze(1) + ans_mask * (a_ans * ans_w).unsqueeze(1)).float()  # [N, T]


def diagnostics(rewards: torch.Tensor, layout: Layout, thoughts: int, answers: int, eps: float) -> dict[str, float]:
    """Per-step figures: the thoughts' value spread, and the first-order (delta-method) variance of the
    thought advantage due to answer sampling, Var(V_k) / Var_k(V) with Var(V_k) = s_k^2 / M (ALGORITHMS.md
    §3.3), averaged over prompts whose thoughts differ; with M = 1 it cannot be estimated (NaN)."""
    n = rewards.shape[0]
    r = torch.where(layout.complete, rewards.float(), torch.zeros_like(rewards.float()))
    r = r.double().reshape(n // (thoughts * answers), thoughts, answers)
    values = r.mean(-1)  # [P, K]
    out = {"grpo_ma/complete_frac": float(layout.complete.float().mean()),
           "grpo_ma/thought_tokens_mean": float(layout.thought_tokens.float().mean()),
           "grpo_ma/thought_value_std": float(values.std(-1).mean()) if thoughts > 1 else 0.0}
    if answers > 1 and thoughts > 1:
        noise = (r.var(-1) / answers).mean(-1)  # [P] mean over thoughts of Var(V_k)
        signal = values.var(-1)  # [P]
        keep = signal > eps
        out["grpo_ma/thought_adv_noise_var"] = float((noise[keep] / signal[keep]).mean()) if bool(keep.any()) \
            else float("nan")
    else:
        out["grpo_ma/thought_adv_noise_var"] = float("nan")
    return out
