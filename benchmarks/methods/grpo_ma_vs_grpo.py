"""GRPO-MA vs GRPO on chain-of-thought arithmetic (rl/jobs/grpo_ma.yaml: SmolLM2-135M + LoRA), at about equal
sampled tokens per step. Prints one JSON object and writes it to --out.

Part A, thought-advantage variance (the paper's claim, measured with the real model): per prompt, sample
`thoughts` thoughts and a pool of `pool` answers for each (rollout/multi_answer.py). Redrawing answers from
the pools (bootstrap), the variance of each thought's advantage given the thoughts is
    GRPO:     one answer per thought, G thoughts               (A = normalised reward of the response)
    GRPO-MA:  M answers per thought, K thoughts                (A^th = normalised mean answer reward)
with (G, K, M) chosen so G*(|th|+|ans|) ~ K*|th| + K*M*|ans| with the measured mean lengths.
Part B, training: `rl train grpo_ma` and the same job with `algorithm: grpo` (group size G, the whole
response one sequence, seq_mean_token_mean), once per `--seeds` seed; per-step reward, pre-clip gradient norm and
sampled tokens from each run's metrics.jsonl. Gradient-norm spread (max/median, coefficient of variation) is
reported over all steps and over the steps with reward variance only: a step where no group has reward variance
has a zero gradient, and GRPO has more of them, which alone makes its spikes look larger.

    nice -n 15 python -m benchmarks.methods.grpo_ma_vs_grpo --steps 8 --seeds 0 1 2 \\
        --part-a-from benchmarks/results/grpo_ma_vs_grpo/part_a.json \\
        --out benchmarks/results/grpo_ma_vs_grpo/seeds3.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import emit, spread


def sample_pools(job, prompts: int, thoughts: int, pool: int, seed: int):
    """(rewards [P, thoughts, pool] with incomplete thoughts at 0, mean thought tokens, mean answer tokens)."""
    from rewards.cot import answer_after
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model
    from rl.types import MultiAnswerSpec, SamplingParams
    from rollout.engine import build_engine
    from rollout.multi_answer import META_KEY, generate_multi_answer

    model_dir = resolve_model(job.model.path)
    engine = build_engine(job.rollout, model_dir, job.model.dtype, "cpu", job.seed)
    batch_prompts = list(build_env(job, load_tokenizer(model_dir)).train_prompts())[:prompts]
    a = job.algorithm
    spec = MultiAnswerSpec(answers_per_thought=pool, delimiter=a.thought_delimiter,
                           answer_max_new_tokens=a.answer_max_new_tokens)
    params = SamplingParams(group_size=thoughts, max_new_tokens=job.rollout.max_new_tokens,
                            temperature=job.rollout.temperature, seed=seed, multi_answer=spec)
    batch = generate_multi_answer(engine, batch_prompts, params)
    rewards, th_len, ans_len = [], [], []
    for i in range(batch.num_samples):
        info = batch.sample_meta[i][META_KEY]
        ok = info["complete"]
        r = answer_after(batch.prompt_texts[i], batch.completion_texts[i], batch.sample_meta[i]["answer"],
                         delimiter=a.thought_delimiter) if ok else 0.0
        rewards.append(float(r))
        n_ans = int(batch.attention_mask[i].sum()) - int(batch.prompt_lengths[i]) - info["thought_tokens"]
        ans_len.append(n_ans)
        if info["answer"] == 0:
            th_len.append(info["thought_tokens"])
    engine.close()
    complete = sum(batch.sample_meta[i][META_KEY]["complete"] for i in range(0, batch.num_samples, pool))
    return (torch.tensor(rewards).reshape(prompts, thoughts, pool), statistics.mean(th_len),
            statistics.mean(ans_len), complete / (prompts * thoughts))


def advantage_variance(rewards: torch.Tensor, k: int, m: int, draws: int, seed: int) -> dict[str, float]:
    """Mean over prompts and thoughts of Var(A^th_k | thoughts) under answer redraws from the pools.
    rewards [P, T, L]; the first k thoughts of each prompt are used, m answers drawn with replacement."""
    from trainers.grpo_ma import thought_advantages

    gen = torch.Generator().manual_seed(seed)
    p, _, pool = rewards.shape
    idx = torch.randint(pool, (draws, p, k, m), generator=gen)  # [S, P, k, m]
    drawn = torch.gather(rewards[:, :k].unsqueeze(0).expand(draws, p, k, pool), 3, idx)  # [S, P, k, m]
    adv = thought_advantages(drawn.reshape(draws * p, k, m), 1e-6).reshape(draws, p, k)
    var = adv.var(0)  # [P, k] over redraws
    varied = rewards[:, :k].flatten(1).std(1) > 0  # prompts where some answer differs
    return {"var_all_prompts": float(var.mean()),
            "var_prompts_with_signal": float(var[varied].mean()) if bool(varied.any()) else math.nan,
            "prompts_with_signal": int(varied.sum())}


def run_arm(name: str, overrides: list[str], root: Path) -> list[dict]:
    run = root / name
    cmd = [sys.executable, "-m", "rl.cli", "train", "grpo_ma", f"run_dir={run}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def has_signal(row: dict) -> bool:
    """A step with reward variance in some group: the others have zero advantage everywhere, so a zero gradient,
    which makes a run with many of them look steadier than it is."""
    if "reward/varied_group_frac" in row:
        return row["reward/varied_group_frac"] > 0
    return row.get("reward/std", 1.0) > 0 and row.get("grad_norm", 1.0) > 0


def grad_stats(grads: list[float]) -> dict:
    if not grads:
        return {"steps": 0}
    med = statistics.median(grads)
    return {"steps": len(grads), "grad_norm_mean": statistics.mean(grads), "grad_norm_max": max(grads),
            "grad_norm_max_over_median": max(grads) / med if med else math.nan,
            "grad_norm_cv": statistics.pstdev(grads) / statistics.mean(grads) if statistics.mean(grads) else math.nan}


def summarise_arm(rows: list[dict]) -> dict:
    """Per-step reward, gradient norm and tokens; gradient-norm spread over all steps and, the figure to compare,
    over the steps with reward variance only (`with_signal`)."""
    rows = [r for r in rows if r.get("step", 0) > 0 and "reward/mean" in r]
    finite = [r for r in rows if math.isfinite(r.get("grad_norm", math.nan))]
    rewards = [r["reward/mean"] for r in rows]
    half = len(rewards) // 2
    return {"steps": len(rows), "reward_per_step": rewards, "grad_norm_per_step": [r["grad_norm"] for r in finite],
            "signal_per_step": [has_signal(r) for r in finite],
            "reward_first_half": statistics.mean(rewards[:half] or rewards),
            "reward_second_half": statistics.mean(rewards[half:]),
            **grad_stats([r["grad_norm"] for r in finite]),
            "with_signal": grad_stats([r["grad_norm"] for r in finite if has_signal(r)]),
            "sampled_tokens_per_step": statistics.mean(r["rollout/tokens"] for r in rows),
            "step_s_mean": statistics.mean(r["time/step_s"] for r in rows),
            "extra": {k: [r[k] for r in rows] for k in rows[0] if k.startswith("grpo_ma/")}}


def part_b(job, args: argparse.Namespace) -> dict:
    """Both arms trained once per seed; the spike figures (steps with reward variance only) per seed and, across
    seeds, the median and range of GRPO-MA / GRPO."""
    root, steps = Path(args.root), f"trainer.max_steps={args.steps}"
    grpo_overrides = [steps, f"rollout.group_size={args.grpo_group}",
                      f"rollout.max_new_tokens={job.rollout.max_new_tokens + job.algorithm.answer_max_new_tokens}",
                      "algorithm={name: grpo, advantage: {name: grpo}, loss: {name: ppo_clip, clip_low: 0.2, "
                      "clip_high: 0.28}, aggregation: {name: seq_mean_token_mean}}"]
    seeds = {}
    for seed in args.seeds:
        seeds[seed] = {"grpo_ma": summarise_arm(run_arm("grpo_ma", [steps, f"seed={seed}"], root / f"seed{seed}")),
                       "grpo": summarise_arm(run_arm("grpo", [*grpo_overrides, f"seed={seed}"], root / f"seed{seed}"))}
    across = {}
    for key in ("grad_norm_max_over_median", "grad_norm_cv"):
        pairs = [(s["grpo_ma"]["with_signal"].get(key), s["grpo"]["with_signal"].get(key)) for s in seeds.values()]
        pairs = [(a, b) for a, b in pairs if a is not None and b and math.isfinite(a) and math.isfinite(b)]
        if pairs:
            across[f"{key}_grpo_ma_over_grpo"] = spread([a / b for a, b in pairs])
    return {"seeds": seeds, "across_seeds_with_signal": across,
            "note": "a claim about spikes needs >= 3 seeds and the steps with reward variance only"}


def part_a(job, args: argparse.Namespace, k: int, m: int) -> dict:
    """Thought-advantage variance of GRPO and GRPO-MA from sampled answer pools."""
    start = time.perf_counter()
    rewards, th, ans, complete = sample_pools(job, args.prompts, max(args.grpo_group, k), args.pool, seed=123)
    return {"prompts": args.prompts, "thoughts_sampled": max(args.grpo_group, k), "pool": args.pool,
            "mean_thought_tokens": th, "mean_answer_tokens": ans, "thought_complete_frac": complete,
            "pool_reward_mean": float(rewards.mean()),
            "tokens_grpo": args.grpo_group * (th + ans), "tokens_grpo_ma": k * th + k * m * ans,
            "grpo": advantage_variance(rewards, args.grpo_group, 1, 4000, 0),
            "grpo_ma": advantage_variance(rewards, k, m, 4000, 0),
            "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=6, help="part A prompts")
    ap.add_argument("--pool", type=int, default=8, help="part A answers per thought")
    ap.add_argument("--grpo-group", type=int, default=6, help="G of the GRPO arm")
    ap.add_argument("--root", default="/tmp/grpo_ma_bench")
    ap.add_argument("--out", default="benchmarks/results/grpo_ma_vs_grpo/result.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="part B: train both arms once per seed")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--part-a-from", default=None, help="reuse part A from an earlier result file (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from rl.config import load_job

    job = load_job("grpo_ma")
    k, m = job.algorithm.thoughts, job.algorithm.answers_per_thought
    if args.part_a_from:  # part A is slow (about 12 min here) and independent of part B
        earlier = json.loads(Path(args.part_a_from).read_text())
        result = {"part_a": earlier.get("part_a", earlier)}
    else:
        result = {"part_a": part_a(job, args, k, m)}
    result.update(job="rl/jobs/grpo_ma.yaml")
    print(json.dumps(result["part_a"]), flush=True)
    if not args.skip_training:
        result["part_b"] = part_b(job, args)
    emit(result, args.out)

if __name__ == "__main__":
    main()
