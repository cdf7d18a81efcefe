"""SAPO controlled experiment: a swarm of N nodes trained with I local + J external rollouts per step
versus the no-sharing baseline (I = I+J, J = 0), at the same number of training samples per step.

The setting follows the paper's controlled experiment (arXiv 2509.08721 §5: 8 Qwen2.5-0.5B agents,
ReasoningGYM, 8 completions per question, GRPO without KL, 4/4 vs 8/0) scaled down to this CPU:
SmolLM2-135M-Instruct + LoRA on one-digit arithmetic, N nodes in lock-step rounds (rl/loop/lockstep.py:
every node generates and publishes, then every node trains), memory transport. Both configurations
use the same seeds per node (node i: seed + i). The paper's measure is the cumulative reward: the
sum over rounds and nodes of each node's mean reward on its own (local) rollouts.

    nice -n 15 python -m benchmarks.methods.sapo_swarm --steps 12 --out benchmarks/results/sapo_swarm/seed0.json
    nice -n 15 python -m benchmarks.methods.sapo_swarm --job sapo --reward math_answer --max-new-tokens 16   # SmolLM2

On the shared 2-CPU host the default is the tiny random Llama (full fine-tune, reward = fraction of
digits in the completion: a random model has something to learn); SmolLM2 + LoRA is the real setting
but one node-step took 330 s there under contention, so it needs a quieter machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._report import emit

CONFIGS = {"shared_4_4": (4, 4), "alone_8_0": (8, 0)}


def node_jobs(args: argparse.Namespace, name: str, local: int, external: int) -> list[Any]:
    from rl.config import load_job

    common = [f"trainer.max_steps={args.steps}", "trainer.save_every_steps=0", f"trainer.lr={args.lr}",
              f"trainer.eval_every_steps={args.steps}", f"eval.num_prompts={args.eval_prompts}",
              f"eval.max_new_tokens={args.max_new_tokens}", f"rollout.group_size={args.group_size}",
              f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.prompts_per_step={local}",
              f"swarm.local={local}", f"swarm.external={external}", "swarm.transport.name=memory",
              f"swarm.transport.board=bench-{name}", "logging.progress=false", "logging.wandb.mode=disabled",
              f"rollout.temperature={args.temperature}",
              *([f"rewards=[{{name: {args.reward}}}]"] if args.reward else []),
              *([f"model.path={args.model}"] if args.model else [])]
    return [load_job(args.job, [*common, f"seed={args.seed + i}", f"swarm.node_id=node{i}",
                              f"run_dir={Path(args.work_dir) / name / f'node{i}'}"]) for i in range(args.nodes)]


def summarise(run_dirs: list[Path]) -> dict[str, Any]:
    from rl.loop.metrics import read_metrics

    nodes = []
    for d in run_dirs:
        rows = [r for r in read_metrics(d) if "reward/mean" in r]
        evals = [r for r in read_metrics(d) if "eval/accuracy" in r]
        nodes.append({"rewards": [r["reward/mean"] for r in rows],
                      "external": [r.get("swarm/external", 0.0) for r in rows],
                      "train_samples": [r.get("swarm/local_samples", 0.0) + r.get("swarm/external_samples", 0.0)
                                        for r in rows],
                      "step_s": statistics.mean(r["time/step_s"] for r in rows),
                      "final_eval_accuracy": evals[-1]["eval/accuracy"] if evals else None})
    per_step = [sum(n["rewards"][s] for n in nodes) for s in range(len(nodes[0]["rewards"]))]
    return {"cumulative_reward": sum(per_step), "reward_per_step_summed_over_nodes": per_step,
            "mean_reward_last_half": statistics.mean(x for n in nodes for x in n["rewards"][len(n["rewards"]) // 2:]),
            "final_eval_accuracy_mean": statistics.mean(n["final_eval_accuracy"] for n in nodes
                                                        if n["final_eval_accuracy"] is not None),
            "train_samples_per_step": statistics.mean(x for n in nodes for x in n["train_samples"]),
            "nodes": nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-prompts", type=int, default=50)
    parser.add_argument("--job", default="tiny", help="base job: tiny (tiny-llama, fast) or sapo (SmolLM2 + LoRA)")
    parser.add_argument("--model", default=None, help="override the base job's model.path")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reward", default="digit_fraction", help="one built-in reward replacing the job's "
                        "(tiny-llama is random: it never answers correctly, digit_fraction gives it a signal)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/sapo_bench")
    parser.add_argument("--only", choices=sorted(CONFIGS), help="run one configuration")
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args(argv)

    import torch

    from rl.loop.lockstep import run_lockstep

    report: dict[str, Any] = {"setup": vars(args) | {"torch_threads": torch.get_num_threads(),
                                                     "machine": "2-CPU shared host, no GPU"}, "configs": {}}
    for name, (local, external) in CONFIGS.items():
        if args.only and name != args.only:
            continue
        start = time.perf_counter()
        dirs = run_lockstep(node_jobs(args, name, local, external))
        report["configs"][name] = {"local": local, "external": external, "wall_s": time.perf_counter() - start,
                                   **summarise(dirs)}
    if len(report["configs"]) == 2:
        shared, alone = (report["configs"][k]["cumulative_reward"] for k in CONFIGS)
        report["cumulative_reward_gain"] = (shared - alone) / alone if alone else None
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
