"""Infinite Sampling (arXiv 2506.22950) vs full-group and naive micro-group decoding, transformers backend.

    python -m benchmarks.perf.infinite_sampling --prompts 2 --repeats 3 \\
        --out benchmarks/results/infinite_sampling/cpu_repeats3.json  # SmolLM2-135M, 2 prompts x G=32 x 128 tokens, g=8
    python -m benchmarks.perf.infinite_sampling --model tiny-llama --prompts 2 --group 8 --tokens 16 --slots 2

Arms (each in its own subprocess, so memory figures do not leak between arms):
- full:     a whole group decoded at once (rollout.hf.max_batch_size = G);
- naive:    micro sampling groups without refill: fixed rounds of g rows (max_batch_size = g);
- infinite: Infinite Sampling with g slots, continuous refill, length-aware plan (order: sjf);
- fifo:     Infinite Sampling with g slots, continuous refill, prompt order (ablation of the length plan; not
            in the default --arms).
Every arm samples the same rows with the same per-sample seeds.

Peak memory = the process's peak resident set during the measured `generate` call minus its resident set
just before it (Linux: the peak is reset through /proc/self/clear_refs; glibc's malloc_trim first returns
freed heap memory, which the measured call could otherwise reuse unseen). Before the measured call each arm
runs one warm-up call on other prompts (G=8), which also gives the length predictor its first data.
Throughput is reported per wall second and per CPU second of the arm's process (one torch thread by
default, so CPU time is compute time even when other jobs share the machine).
`--repeats N` (default 3) runs N rounds of the arms in alternating order; every ratio (peak memory vs full,
throughput vs naive per wall and per CPU second, decode steps) is taken within a round and reported as the
median and range over the rounds, all in one results file. Prints a table and the JSON (--out: also to a file).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import subprocess
import time
from pathlib import Path

from benchmarks._report import REPO, abba, child_env, emit, self_command, spread

ARMS = ("full", "naive", "infinite", "fifo")


def overrides(arm: str, args: argparse.Namespace) -> list[str]:
    base = ["adapter=null", "rollout.backend=hf"]
    if arm == "full":
        return [*base, f"rollout.hf.max_batch_size={args.group}"]
    if arm == "naive":
        return [*base, f"rollout.hf.max_batch_size={args.slots}"]
    order = "sjf" if arm == "infinite" else "fifo"
    return [*base, "rollout.infinite_sampling.enabled=true", f"rollout.infinite_sampling.max_concurrent={args.slots}",
            f"rollout.infinite_sampling.order={order}"]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    """One arm, in this (child) process: warm-up call, then the measured call."""
    import torch

    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model
    from rl.types import SamplingParams
    from rollout.engine import build_engine

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    job = load_job("quickstart", overrides(arm, args))
    prompts = list(build_env(job, load_tokenizer(model_dir)).train_prompts())[: 2 * args.prompts]
    engine = build_engine(job.rollout, model_dir, "float32", "cpu", 0)
    params = SamplingParams(group_size=args.group, max_new_tokens=args.tokens, temperature=args.temperature, seed=1)
    engine.generate(prompts[args.prompts:], SamplingParams(group_size=8, max_new_tokens=args.tokens, seed=2))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed memory back, or it hides this call's peak
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = engine.generate(prompts[: args.prompts], params)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = rss_kib("VmHWM")
    lengths = batch.completion_lengths.tolist()
    row = {"arm": arm, "peak_mem_mb": (peak - before) / 1024, "seconds": seconds, "cpu_seconds": cpu_seconds,
           "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
           "tokens_per_cpu_s": sum(lengths) / cpu_seconds,
           "mean_length": sum(lengths) / len(lengths),
           "stop_fraction": batch.finish_reasons.count("stop") / len(lengths),
           "row_hashes": [hashlib.sha1(str(r).encode()).hexdigest()[:12] for r in batch.input_ids.tolist()]}
    row.update(decode_steps(engine, lengths, arm, args))
    return row


def decode_steps(engine, lengths: list[int], arm: str, args: argparse.Namespace) -> dict:
    """Batched decode forwards: from the engine's own stats (slots), or per round (max length - 1) otherwise."""
    stats = getattr(engine.infinite, "last_stats", None)
    if stats is not None:
        return {"decode_steps": stats.decode_steps, "refills": stats.refills, "max_concurrent": stats.max_concurrent,
                "max_width": stats.max_width, "prefills": stats.prefills, "peak_open_prompts": stats.peak_open_prompts}
    size = args.group if arm == "full" else args.slots
    rounds = [lengths[i:i + size] for i in range(0, len(lengths), size)]
    return {"decode_steps": sum(max(r) - 1 for r in rounds), "max_concurrent": size, "prefills": len(lengths)}


def run_paired(args: argparse.Namespace) -> dict:
    """naive, infinite, infinite, naive on one shared model in one process (ABBA), so load drift on a shared
    machine hits both arms alike; CPU and wall seconds summed per arm."""
    import torch

    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model
    from rl.types import SamplingParams
    from rollout.engine import build_engine

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    naive = build_engine(load_job("quickstart", overrides("naive", args)).rollout, model_dir, "float32", "cpu", 0)
    infinite = build_engine(load_job("quickstart", overrides("infinite", args)).rollout, model_dir, "float32", "cpu", 0,
                            model=naive.model)
    prompts = list(build_env(load_job("quickstart", ["adapter=null"]), load_tokenizer(model_dir)).train_prompts())
    params = SamplingParams(group_size=args.group, max_new_tokens=args.tokens, temperature=args.temperature, seed=1)
    infinite.generate(prompts[args.prompts:2 * args.prompts], params)  # warm-up; the predictor's first data
    totals = {"naive": [0.0, 0.0, 0], "infinite": [0.0, 0.0, 0]}
    for name, engine in (("naive", naive), ("infinite", infinite), ("infinite", infinite), ("naive", naive)):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = engine.generate(prompts[: args.prompts], params)
        t = totals[name]
        t[0], t[1], t[2] = t[0] + time.perf_counter() - start, t[1] + time.process_time() - cpu_start, \
            t[2] + int(batch.completion_lengths.sum())
    return {name: {"seconds": s, "cpu_seconds": c, "tokens": n, "tokens_per_s": n / s, "tokens_per_cpu_s": n / c}
            for name, (s, c, n) in totals.items()}


def child(arm: str, args: argparse.Namespace) -> dict:
    """One arm in its own process, so that its memory figures are its own."""
    cmd = self_command(__spec__.name, "--arm", arm, *[f"--{k}={v}" for k, v in vars(args).items()
                                                      if k not in ("arm", "out", "arms", "paired", "repeats")])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=child_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarise(rows: dict, args: argparse.Namespace) -> dict:
    ref = rows.get("full", next(iter(rows.values())))["row_hashes"]
    for r in rows.values():
        r["same_rows_as_full"] = sum(a == b for a, b in zip(r.pop("row_hashes"), ref)) / len(ref)
    goals = {}
    if {"full", "infinite"} <= rows.keys():
        goals["peak_mem_ratio_vs_full"] = rows["infinite"]["peak_mem_mb"] / rows["full"]["peak_mem_mb"]
    if {"naive", "infinite"} <= rows.keys():
        goals["throughput_ratio_vs_naive"] = rows["infinite"]["tokens_per_s"] / rows["naive"]["tokens_per_s"]
        goals["cpu_throughput_ratio_vs_naive"] = (rows["infinite"]["tokens_per_cpu_s"]
                                                  / rows["naive"]["tokens_per_cpu_s"])
        goals["decode_step_ratio_vs_naive"] = rows["infinite"]["decode_steps"] / rows["naive"]["decode_steps"]
    if {"naive", "fifo"} <= rows.keys():
        goals["fifo_throughput_ratio_vs_naive"] = rows["fifo"]["tokens_per_s"] / rows["naive"]["tokens_per_s"]
    return {"results": list(rows.values()), "goals": goals}


def run_repeats(args: argparse.Namespace) -> dict:
    """`args.repeats` rounds of the arms in alternating order (A B C, C B A, ...); each ratio (memory vs full,
    throughput vs naive, ...) is computed within a round, then reported as the median and range over rounds."""
    arms = args.arms.split(",")
    order = abba(arms, args.repeats)
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for arm in order:
        runs[arm].append(child(arm, args))
    rounds = [summarise({a: runs[a][i] for a in arms}, args) for i in range(args.repeats)]
    return {"benchmark": "infinite_sampling", "model": args.model,
            "workload": {k: v for k, v in vars(args).items() if k not in ("arm", "out")}, "order": order,
            "rounds": rounds, "goals": {k: spread([r["goals"][k] for r in rounds]) for k in rounds[0]["goals"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=8, help="g: concurrent sequences for naive/infinite/fifo")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm (1: CPU time is compute time)")
    parser.add_argument("--arms", default="full,naive,infinite", help=f"any of {','.join(ARMS)}")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the arms in alternating order; ratios reported as median and range")
    parser.add_argument("--out", default=None)
    parser.add_argument("--paired", action="store_true",
                        help="throughput only: naive/infinite alternated in one process")
    args = parser.parse_args()
    if args.paired:
        paired = run_paired(args)
        ratios = {k: paired["infinite"][k] / paired["naive"][k] for k in ("tokens_per_s", "tokens_per_cpu_s")}
        emit({"benchmark": "infinite_sampling_paired", "workload": vars(args), "results": paired,
              "throughput_ratio_vs_naive": ratios}, args.out)
        return
    if args.arm:
        print(json.dumps(run_arm(args.arm, args)))
        return
    report = run_repeats(args)
    print(f"{'arm':9s} {'peak MB':>8s} {'tokens/s':>9s} {'tok/cpu-s':>9s} {'seconds':>8s} {'steps':>6s} "
          f"{'mean len':>9s} {'same rows':>9s}   (round 1)")
    for r in report["rounds"][0]["results"]:
        print(f"{r['arm']:9s} {r['peak_mem_mb']:8.1f} {r['tokens_per_s']:9.1f} {r['tokens_per_cpu_s']:9.1f} "
              f"{r['seconds']:8.1f} {r['decode_steps']:6d} {r['mean_length']:9.1f} {r['same_rows_as_full']:9.2f}")
    for k, v in report["goals"].items():
        print(f"{k}: median {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}] over {v['n']} rounds")
    emit(report, args.out)

if __name__ == "__main__":
    main()
