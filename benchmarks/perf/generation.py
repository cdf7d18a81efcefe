"""Rollout throughput and weight-sync time, per backend, on the same workload.

    python -m benchmarks.perf.generation                       # SmolLM2-135M, 16 prompts x 8 x 64 tokens
    python -m benchmarks.perf.generation --model tiny-llama --prompts 4 --group 4 --tokens 16
    python -m benchmarks.perf.generation --backends vllm --sync-models tiny-llama   # + sync time vs model size

Prints a table and one JSON line. Tokens/s counts generated (completion) tokens over wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._report import emit


def workload(model_dir: str, prompts: int) -> list:
    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer

    job = load_job("quickstart", ["adapter=null"])
    return list(build_env(job, load_tokenizer(model_dir)).train_prompts())[:prompts]


def bench_backend(backend: str, model_dir: str, prompts: list, args: argparse.Namespace) -> dict:
    from rl.config import load_job
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
    sync = sync_seconds(engine, model_dir, args.sync_repeats)
    engine.close()
    tokens, seconds = sum(r[0] for r in runs), sum(r[1] for r in runs)
    return {"backend": backend, "startup_s": startup, "tokens_per_s": tokens / seconds,
            "tokens_per_call": tokens / len(runs), **sync}


def sync_seconds(engine, model_dir: str, repeats: int) -> dict:
    """Full-weight push time (min and all of `repeats`; the first also pays for mapping the buffer)."""
    from rl.models import load_causal_lm

    weights = load_causal_lm(model_dir).state_dict()
    syncs = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.push_weights(weights.items(), 1)
        syncs.append(time.perf_counter() - t)
    distinct = {v.untyped_storage().data_ptr(): v for v in weights.values()}.values()  # tied weights once
    return {"weight_sync_s": min(syncs), "weight_sync_s_median": statistics.median(syncs), "weight_sync_s_all": syncs,
            "sync_path": getattr(engine, "sync_path", "copy"),
            "weights_mb": sum(v.numel() * v.element_size() for v in distinct) / 2**20}


def bench_sync_only(model: str, repeats: int) -> dict:
    """vLLM weight-sync seconds for another model size (no generation)."""
    from rl.config import load_job
    from rl.models import resolve_model
    from rollout.engine import build_engine

    model_dir = resolve_model(model)
    engine = build_engine(load_job("quickstart", ["adapter=null", "rollout.backend=vllm"]).rollout, model_dir,
                          "float32", "cpu", 0)
    try:
        return {"model": model, **sync_seconds(engine, model_dir, repeats)}
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sync-repeats", type=int, default=6)
    parser.add_argument("--sync-models", default="", help="comma-separated extra models: vLLM sync time vs size")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    from rl.models import resolve_model

    torch.set_num_threads(torch.get_num_threads())
    model_dir = resolve_model(args.model)
    prompts = workload(model_dir, args.prompts)
    rows = [bench_backend(b, model_dir, prompts, args) for b in args.backends.split(",")]
    sizes = [bench_sync_only(m, args.sync_repeats) for m in filter(None, args.sync_models.split(","))]
    print(f"{'backend':8s} {'tokens/s':>9s} {'tokens/call':>12s} {'sync s (min/median)':>20s} {'MB':>7s} "
          f"{'start s':>8s}")
    for r in rows:
        sync = f"{r['weight_sync_s']:.2f}/{r['weight_sync_s_median']:.2f}"
        print(f"{r['backend']:8s} {r['tokens_per_s']:9.1f} {r['tokens_per_call']:12.0f} {sync:>20s} "
              f"{r['weights_mb']:7.0f} {r['startup_s']:8.1f}")
    for r in sizes:
        print(f"vllm sync {r['model']}: {r['weight_sync_s']:.2f} s for {r['weights_mb']:.0f} MB")
    emit({"benchmark": "generation", "model": args.model, "workload": vars(args), "results": rows,
          "sync_vs_size": sizes}, args.out, indent=None)


if __name__ == "__main__":
    main()
