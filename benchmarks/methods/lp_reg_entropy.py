"""Policy entropy with and without Lp-Reg: the built-in `quickstart` (ppo_clip) and `lp_reg` jobs, which differ
only in the loss, run with the same reduced overrides; prints both `policy/entropy` curves as JSON.

    python -m benchmarks.methods.lp_reg_entropy --steps 10 --prompts 2 --max-new-tokens 16 --work-dir /tmp/lr_ent
    python -m benchmarks.methods.lp_reg_entropy --work-dir /tmp/lr_ent --collect-only     # runs already there
    python -m benchmarks.methods.lp_reg_entropy --steps 36 --set rollout.temperature=1.0 --sequential \
        --work-dir /tmp/t1 --lp-set algorithm.loss.neg_fraction=0.25              # an override for the lp_reg arm only

Entropy is the learner's mean per-token entropy of the full next-token distribution over the step's
completion tokens (at the sampling temperature), logged by the trainer before its update.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks._report import emit

ARMS = {"grpo": "quickstart", "lp_reg": "lp_reg"}
KEYS = ("policy/entropy", "reward/mean", "lp_reg/protected_frac", "lp_reg/selected_frac", "lp_reg/proxy_kl",
        "time/step_s")


def overrides(args: argparse.Namespace, arm: str = "grpo") -> list[str]:
    return [f"rollout.prompts_per_step={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"trainer.max_steps={args.steps}", "trainer.eval_before_train=false", "trainer.eval_every_steps=0",
            "trainer.save_every_steps=0", "logging.wandb.mode=disabled", "logging.progress=false", *args.set,
            *(args.lp_set if arm == "lp_reg" else [])]


def read_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS if k in r}} for r in rows if r["step"] > 0]


def thirds(values: list[float]) -> list[float]:
    """Means of the first, middle and last third of a curve (where entropy collapse shows)."""
    n = len(values)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [sum(values[a:b]) / max(b - a, 1) for a, b in itertools.pairwise(cuts)]


def run_arms(args: argparse.Namespace, work: Path, repo: Path) -> None:
    """Train both arms. Concurrent arms each get their share of the cores: two processes that both spin up an
    OpenMP pool over every core slow each other down several times over."""
    threads = os.cpu_count() if args.sequential else args.threads_per_arm
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def start(arm: str, job: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "rl.cli", "train", job, *overrides(args, arm), f"run_dir={work / arm}"]
        return subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=open(work / f"{arm}.log", "w"),
                                env=env)

    if args.sequential:
        failed = [arm for arm, job in ARMS.items() if start(arm, job).wait()]
    else:
        procs = {arm: start(arm, job) for arm, job in ARMS.items()}
        failed = [arm for arm, proc in procs.items() if proc.wait()]
    if failed:
        raise SystemExit(f"arm(s) {failed} failed; logs in {work}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for both arms (repeatable), e.g. rollout.temperature=1.0")
    p.add_argument("--lp-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for the lp_reg arm only (repeatable), e.g. algorithm.loss.neg_fraction=0.25")
    p.add_argument("--sequential", action="store_true",
                   help="one arm after the other, each with every core (default: both at once, half the cores each)")
    p.add_argument("--threads-per-arm", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    if not args.collect_only:
        run_arms(args, work, repo)
    curves = {arm: read_curve(work / arm) for arm in ARMS}
    common = min(len(c) for c in curves.values())
    protected = [r.get("lp_reg/protected_frac", 0.0) for r in curves["lp_reg"][:common]]
    result = {"args": vars(args), "overrides": {arm: overrides(args, arm) for arm in ARMS}, "curves": curves,
              "steps_compared": common,
              "entropy_mean_over_steps": {a: sum(r["policy/entropy"] for r in c[:common]) / max(common, 1)
                                          for a, c in curves.items()},
              "entropy_last_common_step": {a: c[common - 1]["policy/entropy"] if common else None
                                           for a, c in curves.items()},
              "entropy_mean_by_third": {a: thirds([r["policy/entropy"] for r in c[:common]])
                                        for a, c in curves.items()},
              "protected_frac_mean": sum(protected) / max(common, 1),
              "reward_mean_by_third": {a: thirds([r["reward/mean"] for r in c[:common]]) for a, c in curves.items()}}
    emit(result, args.out)


if __name__ == "__main__":
    main()
