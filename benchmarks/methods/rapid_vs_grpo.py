"""Wall-clock time to a held-out reward target: RAPID (large inference batch, H off-policy mini-batch updates)
against on-policy GRPO (one inference batch per update), on the same job, machine and number of updates.

    python -m benchmarks.methods.rapid_vs_grpo                       # tiny job, 96 updates per arm, both arms at once
    python -m benchmarks.methods.rapid_vs_grpo --updates 48 --target 0.3 \\
        --out benchmarks/results/rapid_vs_grpo/result.json
    python -m benchmarks.methods.rapid_vs_grpo --arms "" --work-dir DIR --targets 0.65 0.75  # re-read runs in DIR

Both arms run the real CLI (`rl train`) on the tiny job with the same seed, learning rate, group size and
samples per update (`--prompts` prompts x group); they differ only in how data is generated and used:
- grpo : `--prompts` prompts per step, one update per step, ppo_clip + GRPO advantages (on-policy);
- rapid: H x `--prompts` prompts per step (one large generation), H mini-batch updates on it, loss `rapid`.
Every arm evaluates greedily on the same held-out prompts after every H updates; the clock is the running
sum of `time/step_s` (generation + scoring + training + weight sync; evaluation and checkpoints excluded).
Time to target = the clock at the first evaluation whose `eval/reward_mean` >= target. By default the arms
run concurrently so that they share the (contended) CPU equally; `--sequential` runs them one after another.
Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._report import emit


def arm_overrides(arm: str, args: argparse.Namespace) -> list[str]:
    h = args.h
    common = [f"seed={args.seed}", f"trainer.lr={args.lr}", f"rollout.group_size={args.group}",
              f"rollout.max_new_tokens={args.max_new_tokens}", "trainer.save_every_steps=0",
              "trainer.eval_before_train=true", f"eval.num_prompts={args.eval_prompts}",
              "logging.wandb.mode=disabled", "logging.progress=false", "algorithm.aggregation.name=token_mean"]
    if arm == "grpo":
        return [*common, f"rollout.prompts_per_step={args.prompts}", f"trainer.max_steps={args.updates}",
                f"trainer.eval_every_steps={h}", "algorithm.loss.name=ppo_clip"]
    return [*common, f"rollout.prompts_per_step={args.prompts * h}", f"trainer.max_steps={args.updates // h}",
            f"trainer.mini_batches={h}", "trainer.eval_every_steps=1",
            # the whole section: a job's ppo_clip keys (clip_low, ...) are not keys of the rapid loss
            f"algorithm.loss={{name: rapid, behaviour_logprobs: {args.behaviour}}}"]


def curve(run_dir: Path, updates_per_step: int) -> list[dict]:
    """[{updates, clock_s, eval_reward, eval_accuracy}] at every evaluation (step 0 included)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    clock, out = 0.0, []
    for r in sorted(rows, key=lambda r: r["step"]):
        clock += r.get("time/step_s", 0.0)
        if "eval/reward_mean" in r:
            out.append({"updates": r["step"] * updates_per_step, "clock_s": round(clock, 2),
                        "eval_reward": r["eval/reward_mean"], "eval_accuracy": r.get("eval/accuracy"),
                        "entropy": r.get("policy/entropy")})
    return out


def time_to(points: list[dict], target: float) -> float | None:
    return next((p["clock_s"] for p in points if p["eval_reward"] >= target and p["updates"] > 0), None)


def interpolated_time_to(points: list[dict], target: float) -> float | None:
    """The clock at which the curve, read as straight lines between evaluations, first reaches `target`: less
    at the mercy of where the evaluations happen to fall than the first evaluation at or above it."""
    for a, b in itertools.pairwise(points):
        if b["eval_reward"] >= target > a["eval_reward"]:
            return round(a["clock_s"] + (target - a["eval_reward"]) / (b["eval_reward"] - a["eval_reward"])
                         * (b["clock_s"] - a["clock_s"]), 2)
    return None


def savings(result: dict, targets: list[float]) -> dict[str, dict]:
    """Per target: each arm's interpolated time to it and RAPID's saving (1 - rapid / grpo)."""
    out = {}
    for t in targets:
        g, r = (interpolated_time_to(result["arms"][a]["curve"], t) for a in ("grpo", "rapid"))
        saving = None if g is None or r is None else round(1 - r / g, 4)
        out[str(t)] = {"grpo_s": g, "rapid_s": r, "rapid_saving": saving}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="tiny")
    p.add_argument("--updates", type=int, default=96, help="optimizer updates per arm (a multiple of --h)")
    p.add_argument("--h", type=int, default=4, help="RAPID: mini-batches (updates) per inference batch")
    p.add_argument("--prompts", type=int, default=2, help="prompts per update (both arms)")
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--target", type=float, default=0.3, help="held-out eval/reward_mean to reach")
    p.add_argument("--targets", type=float, nargs="*", default=[],
                   help="more targets, each reported with interpolated times to it")
    p.add_argument("--behaviour", choices=["learner", "sampler"], default="learner")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--arms", default="grpo,rapid", help="arms to (re)run; the others are read from --work-dir")
    args = p.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rapid_vs_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]  # run this checkout's packages
    procs = {}
    for arm in [a for a in ("grpo", "rapid") if a in args.arms.split(",")]:
        cmd = [sys.executable, "-m", "rl.cli", "train", args.job, *arm_overrides(arm, args), f"run_dir={work / arm}"]
        with open(work / f"{arm}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs[arm] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=repo)
        if args.sequential:
            procs[arm].wait()
    codes = {arm: proc.wait() for arm, proc in procs.items()}
    if any(codes.values()):
        raise SystemExit(f"a run failed: {codes}; logs in {work}")
    result = {"job": args.job, "args": vars(args), "work_dir": str(work), "arms": {}}
    for arm, per_step in (("grpo", 1), ("rapid", args.h)):
        points = curve(work / arm, per_step)
        result["arms"][arm] = {"time_to_target_s": time_to(points, args.target), "total_clock_s": points[-1]["clock_s"],
                               "final_eval_reward": points[-1]["eval_reward"], "curve": points}
    g, r = result["arms"]["grpo"]["time_to_target_s"], result["arms"]["rapid"]["time_to_target_s"]
    result["rapid_time_saving"] = None if g is None or r is None else round(1 - r / g, 4)
    total_g, total_r = result["arms"]["grpo"]["total_clock_s"], result["arms"]["rapid"]["total_clock_s"]
    result["rapid_total_time_saving"] = round(1 - total_r / total_g, 4)
    result["interpolated"] = savings(result, [args.target, *args.targets])
    emit(result, args.out)


if __name__ == "__main__":
    main()
