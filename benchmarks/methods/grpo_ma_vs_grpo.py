"""GRPO-MA vs GRPO on chain-of-thought arithmetic (rl/jobs/grpo_ma.yaml: SmolLM2-135M + LoRA), at about equal
sampled tokens per step. Prints one JSON object and writes it to --out.

Part A, thought-advantage variance (the paper's claim, measured with the real model): per prompt, sample
`thoughts` thoughts and a pool of `pool` answers for each (rollout/multi_answer.py). Redrawing answers from
the pools (bootstrap), the variance of each thought's advantage given the thoughts is
    GRPO:     one answer per thought, G thoughts               (A = normalised reward of the response)
    GRPO-MA:  M answers per thought, K thoughts                (A^th = normalised mean answer reward)
with (G, K, M) chosen so G*(|th|+|ans|) ~ K*|th| + K*M*|ans| with the measured mean lengths.
Part B, training: `rl train grpo_ma` and the same job with `algorithm: grpo` (group size G, the whole
response one sequence, seq_mean_token_mean); per-step reward, pre-clip gradient norm and sampled tokens
from each run's metrics.jsonl.

    nice -n 15 python -m benchmarks.methods.grpo_ma_vs_grpo --steps 6 --out benchmarks/results/grpo_ma_vs_grpo/result.json
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


def sample_pools(job, prompts: int, thoughts: int, pool: int, seed: int):
    """(rewards [P, thoughts, pool] with incomplete thoughts at 0, mean thought tokens, mean answer tokens)."""
    from rl.models import load_tokenizer, resolve_model
    from rl.runtime import build_env
    from rl.types import MultiAnswerSpec, SamplingParams
    from rewards.cot import answer_after
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


def summarise_arm(rows: list[dict]) -> dict:
    rows = [r for r in rows if r.get("step", 0) > 0]
    grads = [r["grad_norm"] for r in rows if math.isfinite(r.get("grad_norm", math.nan))]
    rewards = [r["reward/mean"] for r in rows]
    half = len(rewards) // 2
    med = statistics.median(grads)
    return {"steps": len(rows), "reward_per_step": rewards, "grad_norm_per_step": grads,
            "reward_first_half": statistics.mean(rewards[:half]), "reward_second_half": statistics.mean(rewards[half:]),
            "grad_norm_mean": statistics.mean(grads), "grad_norm_max": max(grads),
            "grad_norm_max_over_median": max(grads) / med,
            "grad_norm_cv": statistics.pstdev(grads) / statistics.mean(grads),
            "sampled_tokens_per_step": statistics.mean(r["rollout/tokens"] for r in rows),
            "step_s_mean": statistics.mean(r["time/step_s"] for r in rows),
            "extra": {k: [r[k] for r in rows] for k in rows[0] if k.startswith("grpo_ma/")}}


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
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=6, help="part A prompts")
    ap.add_argument("--pool", type=int, default=8, help="part A answers per thought")
    ap.add_argument("--grpo-group", type=int, default=6, help="G of the GRPO arm")
    ap.add_argument("--root", default="/tmp/grpo_ma_bench")
    ap.add_argument("--out", default="benchmarks/results/grpo_ma_vs_grpo/result.json")
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
    result.update(machine="2-CPU host", job="rl/jobs/grpo_ma.yaml")
    print(json.dumps(result["part_a"]), flush=True)
    if not args.skip_training:
        root = Path(args.root)
        steps = f"trainer.max_steps={args.steps}"
        ma = run_arm("grpo_ma", [steps], root)
        grpo = run_arm("grpo", [steps, f"rollout.group_size={args.grpo_group}",
                                f"rollout.max_new_tokens={job.rollout.max_new_tokens + job.algorithm.answer_max_new_tokens}",
                                "algorithm={name: grpo, advantage: {name: grpo}, loss: {name: ppo_clip, clip_low: 0.2, "
                                "clip_high: 0.28}, aggregation: {name: seq_mean_token_mean}}"], root)
        result["part_b"] = {"grpo_ma": summarise_arm(ma), "grpo": summarise_arm(grpo)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
