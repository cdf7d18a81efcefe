"""Policy entropy with and without Lp-Reg: the built-in `quickstart` (ppo_clip) and `lp_reg` jobs, which differ
only in the loss, run with the same reduced overrides; prints both `policy/entropy` curves as JSON.

    python benchmarks/lp_reg_entropy.py --steps 10 --prompts 2 --max-new-tokens 16 --work-dir /tmp/lr_ent
    python benchmarks/lp_reg_entropy.py --work-dir /tmp/lr_ent --collect-only     # runs already there

Entropy is the learner's mean per-token entropy of the full next-token distribution over the step's
completion tokens (at the sampling temperature), logged by the trainer before its update.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ARMS = {"grpo": "quickstart", "lp_reg": "lp_reg"}
KEYS = ("policy/entropy", "reward/mean", "lp_reg/protected_frac", "lp_reg/selected_frac", "time/step_s")


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"rollout.prompts_per_step={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"trainer.max_steps={args.steps}", "trainer.eval_before_train=false", "trainer.eval_every_steps=0",
            "trainer.save_every_steps=0", "logging.wandb.mode=disabled", "logging.progress=false"]


def read_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS if k in r}} for r in rows if r["step"] > 0]


def thirds(values: list[float]) -> list[float]:
    """Means of the first, middle and last third of a curve (where entropy collapse shows)."""
    n = len(values)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [sum(values[a:b]) / max(b - a, 1) for a, b in zip(cuts, cuts[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--threads-per-arm", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    if not args.collect_only:
        # Concurrently, so both share the CPU equally, each with its own threads: two processes that both spin up
        # an OpenMP pool over every core slow each other down several times over.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_arm), "MKL_NUM_THREADS": str(args.threads_per_arm)}
        procs = [subprocess.Popen([sys.executable, "-m", "rl.cli", "train", job, *overrides(args),
                                   f"run_dir={work / arm}"], cwd=repo, stdout=subprocess.DEVNULL,
                                  stderr=open(work / f"{arm}.log", "w"), env=env)
                 for arm, job in ARMS.items()]
        if any(proc.wait() for proc in procs):
            raise SystemExit(f"a run failed; logs in {work}")
    curves = {arm: read_curve(work / arm) for arm in ARMS}
    common = min(len(c) for c in curves.values())
    result = {"args": vars(args), "overrides": overrides(args), "curves": curves, "steps_compared": common,
              "entropy_mean_over_steps": {a: sum(r["policy/entropy"] for r in c[:common]) / max(common, 1)
                                          for a, c in curves.items()},
              "entropy_last_common_step": {a: c[common - 1]["policy/entropy"] if common else None
                                           for a, c in curves.items()},
              "entropy_mean_by_third": {a: thirds([r["policy/entropy"] for r in c[:common]]) for a, c in curves.items()},
              "reward_mean_by_third": {a: thirds([r["reward/mean"] for r in c[:common]]) for a, c in curves.items()}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
