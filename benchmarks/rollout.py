"""Rollout throughput and weight-sync time, per backend, on the same workload.

    .venv/bin/python benchmarks/rollout.py                       # SmolLM2-135M, 16 prompts x 8 x 64 tokens
    .venv/bin/python benchmarks/rollout.py --model tiny-llama --prompts 4 --group 4 --tokens 16

Prints a table and one JSON line. Tokens/s counts generated (completion) tokens over wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def workload(model_dir: str, prompts: int) -> list:
    from rl.config import load_job
    from rl.models import load_tokenizer
    from rl.runtime import build_env

    job = load_job("quickstart", ["adapter=null"])
    return list(build_env(job, load_tokenizer(model_dir)).train_prompts())[:prompts]


def bench_backend(backend: str, model_dir: str, prompts: list, args: argparse.Namespace) -> dict:
    from rl.config import load_job
    from rl.models import load_causal_lm
    from rl.types import SamplingParams
    from rollout.engine import build_engine

    cfg = load_job("quickstart", ["adapter=null", f"rollout.backend={backend}"]).rollout
    start = time.perf_counter()
    engine = build_engine(cfg, model_dir, "float32", "cpu", 0)
    startup = time.perf_counter() - start
    params = SamplingParams(group_size=args.group, max_new_tokens=args.tokens, temperature=1.0, seed=0)
    engine.generate(prompts[:2], params)  # warm-up
    runs = []
    for r in range(args.repeats):
        t = time.perf_counter()
        batch = engine.generate(prompts, SamplingParams(group_size=args.group, max_new_tokens=args.tokens, seed=r + 1))
        runs.append((float(batch.completion_lengths.sum()), time.perf_counter() - t))
    weights = load_causal_lm(model_dir).state_dict()
    syncs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine.push_weights(weights.items(), 1)
        syncs.append(time.perf_counter() - t)
    engine.close()
    tokens, seconds = sum(r[0] for r in runs), sum(r[1] for r in runs)
    return {"backend": backend, "startup_s": startup, "tokens_per_s": tokens / seconds,
            "tokens_per_call": tokens / len(runs), "weight_sync_s": min(syncs), "weight_sync_s_all": syncs,
            "params_m": sum(v.numel() for v in weights.values()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from rl.models import resolve_model

    torch.set_num_threads(torch.get_num_threads())
    model_dir = resolve_model(args.model)
    prompts = workload(model_dir, args.prompts)
    rows = [bench_backend(b, model_dir, prompts, args) for b in args.backends.split(",")]
    print(f"{'backend':8s} {'tokens/s':>9s} {'tokens/call':>12s} {'sync s':>7s} {'start s':>8s}")
    for r in rows:
        print(f"{r['backend']:8s} {r['tokens_per_s']:9.1f} {r['tokens_per_call']:12.0f} {r['weight_sync_s']:7.2f} "
              f"{r['startup_s']:8.1f}")
    print(json.dumps({"benchmark": "rollout", "model": args.model, "workload": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
