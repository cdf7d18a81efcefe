"""End-to-end training-step benchmark: where a step's time goes, per job and rollout backend.

    python -m benchmarks.perf.step                                   # tiny and quickstart, hf and vllm
    python -m benchmarks.perf.step --jobs quickstart --backends hf --steps 6

Each (job, backend) runs the real `rl train` for `--steps` steps (no evaluation, checkpoints or logging
services) and reads its metrics.jsonl. Per step, excluding the first (warm-up): generation, scoring,
learner no-grad logprob passes (reference / behaviour / objective inputs; 0 when an on-policy single update
needs none), learner update, weight sync, total; generated and trained tokens per second; and the peak RSS
of the `rl train` process (with vLLM, its engine runs in child processes that this figure leaves out).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._report import emit

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("time/rollout_s", "time/score_s", "time/logprobs_s", "time/update_s", "time/weight_sync_s", "time/step_s")
RATES = ("rollout/tokens_per_s", "train/tokens_per_s")


def run(job: str, backend: str, steps: int, work: Path) -> dict:
    run_dir = work / f"{job}-{backend}"
    cmd = [sys.executable, "-m", "rl.cli", "train", job, f"rollout.backend={backend}", f"trainer.max_steps={steps}",
           f"run_dir={run_dir}", "trainer.eval_before_train=false", "trainer.eval_every_steps=0",
           "trainer.save_every_steps=0", "logging.wandb.mode=disabled", "logging.progress=false"]
    with open(work / f"{job}-{backend}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{job}/{backend} failed; see {work / f'{job}-{backend}.log'}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [r for r in rows if r.get("step", 0) > 1] or [r for r in rows if r.get("step", 0) > 0]
    mean = lambda key: statistics.mean(r.get(key, 0.0) for r in timed)  # noqa: E731
    return {"job": job, "backend": backend, "steps_timed": len(timed), **{k: mean(k) for k in PHASES + RATES},
            "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default="tiny,quickstart")
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(j, b, args.steps, Path(tmp)) for j in args.jobs.split(",") for b in args.backends.split(",")]
    names = ("generate", "score", "logprobs", "update", "sync", "step")
    print(f"{'job':11s} {'backend':7s} " + " ".join(f"{n:>9s}" for n in names) + f" {'gen tok/s':>9s} "
          f"{'train tok/s':>11s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['job']:11s} {r['backend']:7s} " + " ".join(f"{r[k]:9.3f}" for k in PHASES)
              + f" {r['rollout/tokens_per_s']:9.1f} {r['train/tokens_per_s']:11.1f} {r['peak_rss_mib']:9.0f}")
    emit({"benchmark": "step", "steps": args.steps, "results": rows}, args.out, indent=None)


if __name__ == "__main__":
    main()
