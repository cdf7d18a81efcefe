"""What Lp-Reg's token selection reaches on a real rollout, and how hard its pull is there.

Lp-Reg (trainers/lp_reg.py) selects the bottom `neg_fraction` of negative-advantage tokens by probability and
protects those that survive the min-p filter (p >= kappa * p_max); on a protected token y the gradient of the
loss w.r.t. log pi(y) is -A r + beta (1 - pi_proxy(y) / pi(y)). On-policy (one update per batch, r = 1 and
pi = pi_old at the update) the pull is therefore beta (1 - 1/Z), Z the mass the filter keeps at that position:
if Z is near 1 Lp-Reg changes nothing. This script samples the job's own prompts with the hf engine, scores the
tokens with the trainer's functions, and prints, per temperature and selection fraction, the share of selected
tokens that survive the filter and pi_proxy / pi on them (JSON, also to --out).

    python -m benchmarks.methods.lp_reg_reach --temperatures 0.7 1.0 --out benchmarks/results/lp_reg_reach/result.json

Every sampled token is counted (advantage signs need rewards; the selection among negative tokens is a
subset with the same probability profile unless rewards correlate with token rarity).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._report import emit

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def sample_and_score(engine, job, prompts: list, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y) at `temperature`, log pi_proxy(y)) for every sampled completion token, both [K]."""
    from rl.types import SamplingParams
    from trainers.logprobs import token_logprobs
    from trainers.lp_reg import proxy_token_logprobs

    params = SamplingParams(group_size=job.rollout.group_size, max_new_tokens=job.rollout.max_new_tokens,
                            temperature=temperature, seed=seed)
    batch = engine.generate(prompts, params)
    model = engine.model  # the hf engine's own model: the policy that sampled
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, temperature)
        proxy = proxy_token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                     job.algorithm.loss, temperature)
    return logp[batch.loss_mask], proxy[batch.loss_mask]  # both aligned with the tokens they score


def reach(logp: torch.Tensor, proxy: torch.Tensor) -> list[dict]:
    """Per selection fraction: share of the bottom-fraction tokens that survive the filter, pi_proxy/pi on them."""
    order = logp.argsort()
    kept = proxy > -1e3  # filtered tokens carry ~ -1e4
    rows = []
    for frac in FRACTIONS:
        sel = order[: max(2, int(len(logp) * frac))]
        k = kept[sel]
        ratio = (proxy[sel][k] - logp[sel][k]).exp()
        rows.append({"fraction": frac, "selected": len(sel), "kept_share": round(float(k.float().mean()), 4),
                     "proxy_over_pi_mean": round(float(ratio.mean()), 4) if k.any() else None,
                     "proxy_over_pi_max": round(float(ratio.max()), 4) if k.any() else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="lp_reg")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model
    from rollout.engine import build_engine

    job = load_job(args.job)
    result = {"benchmark": "lp_reg_reach", "job": args.job, "prompts": args.prompts,
              "group": job.rollout.group_size, "max_new_tokens": job.rollout.max_new_tokens,
              "min_p": job.algorithm.loss.min_p, "by_temperature": {}}
    model_dir = resolve_model(job.model.path)
    engine = build_engine(job.rollout, model_dir, job.model.dtype, "cpu", job.seed)  # one model for every temperature
    prompts = list(build_env(job, load_tokenizer(model_dir)).train_prompts())[:args.prompts]
    for t in args.temperatures:
        logp, proxy = sample_and_score(engine, job, prompts, t, args.seed)
        result["by_temperature"][str(t)] = {"tokens": len(logp),
                                            "filtered_share": round(float((proxy <= -1e3).float().mean()), 4),
                                            "bottom": reach(logp, proxy)}
    engine.close()
    emit(result, args.out)


if __name__ == "__main__":
    main()
