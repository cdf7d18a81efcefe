"""rlpost vs Hugging Face TRL's GRPOTrainer on the same work, on this machine, in one run.

Same model (SmolLM2-135M-Instruct), task (arithmetic prompts from rlpost's env, rendered once and
given to both as text), reward (last number == answer), group size, prompts per step, completion
length, learning rate, LoRA adapter, clip range (DAPO 0.2/0.28, token-mean loss), no KL.
TRL is installed by this script into its own virtual environment (`benchmarks/.trl-venv`).

    .venv/bin/python benchmarks/vs_trl.py --steps 10
prints a table and one JSON line.

rlpost runs twice: as the quickstart job is (`rlpost`) and with Prefix Grouper switched on
(`rlpost+prefix`, `trainer.shared_prefix=true`: each group's prompt is encoded once in the learner, a
training-equivalent forward; TRL has no such option). Both are the same work as TRL's run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "benchmarks" / ".trl-venv"
# rlpost arms: name -> extra job overrides (the work is the same; only how rlpost does it differs)
RLPOST_ARMS = {"rlpost": [], "rlpost+prefix": ["trainer.shared_prefix=true"]}
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "peft>=0.18,<0.22", "transformers>=5.16.1,<5.20", "datasets"]


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


def job_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"trainer.max_steps={args.steps}", f"trainer.lr={args.lr}",
            f"rollout.group_size={args.group_size}", f"rollout.prompts_per_step={args.prompts_per_step}",
            f"rollout.max_new_tokens={args.max_new_tokens}", "rewards=[{name: last_number}]",
            "trainer.save_every_steps=0", "trainer.eval_every_steps=0", "trainer.eval_before_train=false",
            "logging.wandb.mode=disabled", "logging.progress=false", f"seed={args.seed}"]


def write_spec(args: argparse.Namespace, work: Path) -> Path:
    from rl.config import load_job
    from rl.models import load_tokenizer, resolve_model
    from rl.runtime import build_env

    job = load_job("quickstart", job_overrides(args, work / "rlpost"))
    model_dir = resolve_model(job.model.path, job.model.cache_dir)
    env = build_env(job, load_tokenizer(model_dir))
    prompts = [{"text": p.text, "answer": str(p.meta["answer"])} for p in env.train_prompts()]
    spec = {"model_dir": model_dir, "prompts": prompts, "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
            "max_new_tokens": args.max_new_tokens, "lora_r": job.adapter.r, "lora_alpha": job.adapter.alpha,
            "target_modules": list(job.adapter.target_modules), "out_dir": str(work / "trl")}
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def run_trl(python: Path, spec: Path, work: Path) -> dict:
    out = work / "trl.json"
    start = time.perf_counter()
    subprocess.run([str(python), str(ROOT / "benchmarks" / "_trl_grpo.py"), str(spec), str(out)], check=True)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def run_rlpost(args: argparse.Namespace, work: Path, name: str) -> dict:
    run_dir = work / name
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rl.cli", "train", "quickstart", *job_overrides(args, run_dir),
                    *RLPOST_ARMS[name]], check=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    breakdown = {k: statistics.mean(r[k] for r in rows) for k in
                 ("time/rollout_s", "time/score_s", "time/train_s", "time/weight_sync_s") if all(k in r for r in rows)}
    return {"step_s": [r["time/step_s"] for r in rows], "reward": [r["reward/mean"] for r in rows],
            "breakdown": breakdown, "wall_s": time.perf_counter() - start}


def summarise(name: str, result: dict, skip_first: int = 1) -> dict:
    times = result["step_s"][skip_first:] or result["step_s"]
    rewards = result["reward"]
    last = rewards[-max(1, len(rewards) // 3):]
    return {"name": name, "s_per_step": statistics.mean(times), "reward_first": rewards[0],
            "reward_last_third": statistics.mean(last), "reward_mean": statistics.mean(rewards),
            "wall_s": result["wall_s"], **({"breakdown": result["breakdown"]} if "breakdown" in result else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join([*RLPOST_ARMS, "trl"]),
                        help=f"comma-separated subset of {', '.join([*RLPOST_ARMS, 'trl'])}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = write_spec(args, work)
        arms = [a for a in args.arms.split(",") if a]
        unknown = sorted(set(arms) - {*RLPOST_ARMS, "trl"})
        if unknown:
            parser.error(f"unknown arms {unknown}; choose from {', '.join([*RLPOST_ARMS, 'trl'])}")
        rows = [summarise(a, run_rlpost(args, work, a)) for a in arms if a in RLPOST_ARMS]
        if "trl" in arms:
            rows.append(summarise("trl", run_trl(ensure_trl_venv(), spec, work)))
    print(f"{'':14s} {'s/step':>8s} {'reward@1':>9s} {'reward(last 1/3)':>17s} {'wall s':>8s}")
    for r in rows:
        print(f"{r['name']:14s} {r['s_per_step']:8.2f} {r['reward_first']:9.3f} {r['reward_last_third']:17.3f} "
              f"{r['wall_s']:8.1f}")
    trl = next((r for r in rows if r["name"] == "trl"), None)
    for r in rows:
        if trl is not None and r is not trl:
            r["speedup_vs_trl"] = trl["s_per_step"] / r["s_per_step"]
            print(f"speed-up of {r['name']} (TRL s/step / its s/step): {r['speedup_vs_trl']:.2f}x")
    print(json.dumps({"benchmark": "vs_trl", "settings": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
