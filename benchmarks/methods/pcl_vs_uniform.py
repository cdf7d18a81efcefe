"""PCL (arXiv 2510.01135) vs uniform prompt sampling on arithmetic of mixed difficulty (built-in job `pcl`).

    nice -n 15 python -m benchmarks.methods.pcl_vs_uniform --steps 12 \\
        --out benchmarks/results/pcl_vs_uniform/result.json

Runs the real CLI twice on the same job and seed: `curriculum: null` (uniform) and `curriculum: pcl`, then
compares what PCL is for:
* the share of groups whose rewards are not all equal (`reward/varied_group_frac`; only those groups give a
  non-zero GRPO advantage), per arm;
* the value model's error on the prompts it is about to learn from (`curriculum/value_mse`, measured before
  each update), early vs late;
* the price of picking prompts: value-model selection over the k*m pool (`curriculum/select_seconds`, measured
  in the run) against generating rollouts for the (k-1)*m extra pool prompts, which rollout-based filtering
  (pre-filter / dynamic sampling) would need; the latter is measured directly with the same engine and sampling
  settings, and also extrapolated from the run's own `time/rollout_s`.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._report import emit


def start_arm(name: str, curriculum: str, args: argparse.Namespace) -> subprocess.Popen | None:
    """Start one arm's `rl train` (None if --reuse finds it finished). Both arms run at once: on a contended
    host that halves the wall time, and both see the same contention."""
    run_dir = Path(args.work) / name
    if args.reuse and (run_dir / "metrics.jsonl").is_file() and len(read_rows(run_dir)) == args.steps:
        return None
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = [sys.executable, "-m", "rl.cli", "train", "pcl", f"curriculum={curriculum}", f"run_dir={run_dir}",
           f"trainer.max_steps={args.steps}", f"seed={args.seed}", "trainer.save_every_steps=0",
           "logging.progress=false", "logging.wandb.mode=disabled", f"model.path={args.model}",
           f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
           f"rollout.max_new_tokens={args.tokens}"]
    # Each arm gets its share of the cores: two processes that both spin up an OpenMP pool over every core
    # slow each other down several times over (measured here: 65-80 s per
    # 64 x 12-token rollout that way, against 9-11 s for the quickstart's 32 x 32 tokens run alone).
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with open(Path(args.work) / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_arms(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    Path(args.work).mkdir(parents=True, exist_ok=True)
    procs = {name: start_arm(name, cur, args) for name, cur in (("uniform", "null"), ("pcl", "{name: pcl}"))}
    for name, proc in procs.items():
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"{name} arm failed; see {Path(args.work) / (name + '.log')}")
    return read_rows(Path(args.work) / "uniform"), read_rows(Path(args.work) / "pcl")


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.fmean(values) if values else float("nan")


def arm_summary(rows: list[dict]) -> dict:
    half = len(rows) // 2
    return {"steps": len(rows), "varied_group_frac_mean": mean(rows, "reward/varied_group_frac"),
            "varied_group_frac_second_half": mean(rows[half:], "reward/varied_group_frac"),
            "varied_group_frac_per_step": [r["reward/varied_group_frac"] for r in rows],
            "reward_mean": mean(rows, "reward/mean"), "step_s_mean": mean(rows, "time/step_s"),
            "rollout_s_mean": mean(rows, "time/rollout_s"), "train_s_mean": mean(rows, "time/train_s")}


def value_summary(rows: list[dict]) -> dict:
    third = max(len(rows) // 3, 1)
    mse = [r["curriculum/value_mse"] for r in rows]
    return {"value_mse_per_step": mse, "value_mse_first_third": statistics.fmean(mse[:third]),
            "value_mse_last_third": statistics.fmean(mse[-third:]),
            "selected_pred_mean_per_step": [r["curriculum/selected_pred_mean"] for r in rows],
            "target_mean_per_step": [r["curriculum/target_mean"] for r in rows],
            "select_s_mean": mean(rows, "curriculum/select_seconds"),
            "update_s_mean": mean(rows, "curriculum/update_seconds")}


def measure_rollout_filtering(args: argparse.Namespace) -> dict:
    """Seconds to generate groups for the (k-1)*m extra pool prompts with the job's engine and sampling
    settings: what a rollout-based filter spends per step before it can choose."""
    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.loop.steps import sampling_params
    from rl.models import load_tokenizer, resolve_model
    from rollout.engine import build_engine

    job = load_job("pcl", [f"model.path={args.model}", f"rollout.prompts_per_step={args.prompts}",
                           f"rollout.group_size={args.group}", f"rollout.max_new_tokens={args.tokens}",
                           f"seed={args.seed}"])
    model_dir = resolve_model(job.model.path)
    prompts = list(build_env(job, load_tokenizer(model_dir)).train_prompts())
    extra = args.prompts * (job.curriculum.pool_factor - 1)
    engine = build_engine(job.rollout, model_dir, job.model.dtype, "cpu", job.seed)
    engine.generate(prompts[:1], sampling_params(job, 0))  # warm-up
    seconds = []
    for r in range(args.repeats):
        chosen = prompts[1 + r * extra: 1 + (r + 1) * extra]
        start = time.perf_counter()
        engine.generate(chosen, sampling_params(job, r + 1))
        seconds.append(time.perf_counter() - start)
    engine.close()
    return {"extra_pool_prompts": extra, "generate_extra_s": seconds,
            "generate_extra_s_mean": statistics.fmean(seconds)}


def measure_selection(args: argparse.Namespace) -> dict:
    """Seconds for value-model selection over fresh k*m pools: batched backbone forwards (the implementation)
    and one prompt per forward (for comparison)."""
    import envs.curriculum as pcl
    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model

    job = load_job("pcl", [f"model.path={args.model}", f"seed={args.seed}"])
    model_dir = resolve_model(job.model.path)
    prompts = list(build_env(job, load_tokenizer(model_dir)).train_prompts())
    value = pcl.PCLValueModel(job.curriculum, model_dir, job.model.dtype, job.seed)
    pool = args.prompts * job.curriculum.pool_factor
    result = {"pool_size": pool}
    for label, chunk in (("batched", pcl.FEATURE_BATCH), ("one_prompt_per_forward", 1)):
        pcl.FEATURE_BATCH, seconds = chunk, []
        for r in range(args.repeats):
            _, metrics = value.select(prompts[(r + 1) * pool: (r + 2) * pool], args.prompts)
            seconds.append(metrics["curriculum/select_seconds"])
        result[f"select_s_{label}"] = seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8, help="prompts_per_step (m)")
    parser.add_argument("--group", type=int, default=8, help="group_size (n)")
    parser.add_argument("--tokens", type=int, default=20, help="max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed rollout-filter generations")
    parser.add_argument("--work", default="/tmp/pcl_vs_uniform")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs under --work")
    parser.add_argument("--out", default=None)
    parser.add_argument("--part", choices=("all", "filtering", "select", "report"), default="all",
                        help="filtering: only time rollout-based filtering (to --work/filtering.json), e.g. next to "
                             "running arms; report: summarise the runs under --work as they are (partial runs too)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "select":
        (work / "select.json").write_text(json.dumps(measure_selection(args)))
        return
    if args.part == "filtering":
        (work / "filtering.json").write_text(json.dumps(measure_rollout_filtering(args)))
        return
    if args.part == "all":
        uniform, pcl = run_arms(args)
        (work / "filtering.json").write_text(json.dumps(measure_rollout_filtering(args)))
    else:
        uniform, pcl = read_rows(work / "uniform"), read_rows(work / "pcl")
    filtering = json.loads((work / "filtering.json").read_text())
    steps = min(len(uniform), len(pcl))  # compare the same number of steps
    uniform, pcl = uniform[:steps], pcl[:steps]
    pcl_values = value_summary(pcl)
    report = {
        "machine": f"{os.cpu_count()}-CPU host, torch CPU; the two arms run at once, each on its share of the cores",
        "job": "pcl", "model": args.model, "steps": steps, "prompts_per_step": args.prompts,
        "group_size": args.group, "max_new_tokens": args.tokens, "seed": args.seed,
        "pool_factor": 4, "command": " ".join(sys.argv),
        "uniform": arm_summary(uniform), "pcl": {**arm_summary(pcl), **pcl_values},
        "rollout_filtering": {
            **filtering,
            "extrapolated_from_run_s": mean(pcl, "time/rollout_s") * (filtering["extra_pool_prompts"] / args.prompts),
        },
    }
    if (work / "select.json").is_file():
        micro = json.loads((work / "select.json").read_text())
        report["selection_microbenchmark"] = micro
        report["selection_speedup_batched_vs_rollout_filtering"] = (
            filtering["generate_extra_s_mean"] / statistics.fmean(micro["select_s_batched"]))
    report["selection_speedup_vs_rollout_filtering"] = filtering["generate_extra_s_mean"] / pcl_values["select_s_mean"]
    emit(report, args.out)


if __name__ == "__main__":
    main()
