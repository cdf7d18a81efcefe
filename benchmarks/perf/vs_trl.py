"""rlpost vs Hugging Face TRL's GRPOTrainer on the same work, on this machine, in one run.

Every sampling and training setting of both arms comes from one `Settings` object (its defaults: the quickstart's
sampling and training, with the `last_number` reward both arms can run): rlpost gets it as job overrides of the
quickstart job, TRL as a GRPOConfig and LoraConfig built by benchmarks/perf/_trl_grpo.py from the same values.
Before anything is timed, rlpost's resolved job and TRL's effective config (read back from the built trainer:
its args and generation config) are compared with the settings field by field; any difference stops the run.
After each run the job rlpost wrote (RUN_DIR/config.yaml) and the config TRL trained with are compared again.

Both arms get the same rendered prompts (rlpost's env, chat template applied once) and the same torch thread count.
Per step, each arm records seconds, generated tokens and trained tokens (rlpost: its metrics.jsonl; TRL: the
completion ids handed to the reward function; all completion tokens are trained in both). Reported: s/step and
seconds per 1,000 generated tokens (the first step excluded as warm-up), over `--repeats` rounds run in
alternating order (A B, B A, ...), with the median and range of the per-round ratios TRL / rlpost.
TRL is installed by this script into its own virtual environment (`benchmarks/.trl-venv`).

    python -m benchmarks.perf.vs_trl --steps 8 --repeats 2 --out benchmarks/results/vs_trl/cpu.json
    python -m benchmarks.perf.vs_trl --model tiny-llama --steps 2 --repeats 1 --max-new-tokens 8   # smoke

`--arms rlpost,rlpost+prefix,trl` adds rlpost with Prefix Grouper (`trainer.shared_prefix=true`: each group's
prompt encoded once in the learner, a training-equivalent forward; TRL has no such option).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._report import REPO, abba, child_env, emit, spread

TRL_VENV = REPO / "benchmarks" / ".trl-venv"
TRL_CHILD = Path(__file__).resolve().parent / "_trl_grpo.py"
# rlpost arms: name -> extra job overrides (the work is the same; only how rlpost does it differs)
RLPOST_ARMS = {"rlpost": [], "rlpost+prefix": ["trainer.shared_prefix=true"]}
ARMS = [*RLPOST_ARMS, "trl"]
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "peft>=0.18,<0.22", "transformers>=5.16.1,<5.20", "datasets"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The one source of both arms' settings (names follow rlpost's job keys)."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    """None: no top-k filtering (rlpost -1, TRL 0)."""
    lr: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("k_proj", "o_proj", "q_proj", "v_proj")
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: str = "token_mean"
    std_scope: str = "group"
    """GRPO advantage: each group's rewards normalised by its own std (TRL: scale_rewards='group')."""
    kl_coef: float = 0.0
    seed: int = 0
    steps: int = 8
    threads: int = 2
    reward: str = "last_number"

    def compared(self) -> dict[str, Any]:
        """The fields both arms must resolve to (threads only TRL reports; both get it the same way)."""
        d = dataclasses.asdict(self)
        d["betas"], d["target_modules"] = list(self.betas), sorted(self.target_modules)
        d.pop("model")  # compared as the resolved model directory
        return d


def job_overrides(s: Settings, run_dir: Path) -> list[str]:
    """rlpost's job: the quickstart job with every setting of `s` set explicitly."""
    targets = ", ".join(s.target_modules)
    return [f"run_dir={run_dir}", f"model.path={s.model}", f"model.dtype={s.dtype}", f"seed={s.seed}",
            f"adapter={{name: lora, r: {s.lora_r}, alpha: {s.lora_alpha}, dropout: {s.lora_dropout}, "
            f"target_modules: [{targets}]}}",
            "rollout.backend=hf", f"rollout.group_size={s.group_size}",
            f"rollout.prompts_per_step={s.prompts_per_step}",
            f"rollout.max_new_tokens={s.max_new_tokens}", f"rollout.temperature={s.temperature}",
            f"rollout.top_p={s.top_p}", f"rollout.top_k={-1 if s.top_k is None else s.top_k}", "rollout.stop=[]",
            f"rewards=[{{name: {s.reward}}}]",
            f"algorithm={{name: grpo, advantage: {{name: grpo, std_scope: {s.std_scope}}}, loss: {{name: ppo_clip, "
            f"clip_low: {s.clip_low}, clip_high: {s.clip_high}}}, aggregation: {{name: {s.aggregation}}}, "
            f"kl: {{coef: {s.kl_coef}}}}}",
            f"trainer.max_steps={s.steps}", f"trainer.lr={s.lr}", f"trainer.lr_schedule={s.lr_schedule}",
            f"trainer.warmup_steps={s.warmup_steps}", f"trainer.weight_decay={s.weight_decay}",
            f"trainer.betas=[{s.betas[0]}, {s.betas[1]}]", f"trainer.max_grad_norm={s.max_grad_norm}",
            f"trainer.ppo_epochs={s.ppo_epochs}", f"trainer.mini_batches={s.mini_batches}",
            "trainer.save_every_steps=0", "trainer.eval_every_steps=0", "trainer.eval_before_train=false",
            "trainer.device=cpu", "logging.wandb.mode=disabled", "logging.progress=false"]


def rlpost_view(job: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """A resolved rlpost job (as dumped to config.yaml) in Settings' names."""
    r, a, t, ad = job["rollout"], job["algorithm"], job["trainer"], job["adapter"]
    rewards = job["rewards"]
    return {"model_dir": model_dir, "dtype": job["model"]["dtype"], "group_size": r["group_size"],
            "prompts_per_step": r["prompts_per_step"], "max_new_tokens": r["max_new_tokens"],
            "temperature": r["temperature"], "top_p": r["top_p"], "top_k": None if r["top_k"] == -1 else r["top_k"],
            "lr": t["lr"], "lr_schedule": t["lr_schedule"], "warmup_steps": t["warmup_steps"],
            "weight_decay": t["weight_decay"], "betas": list(t["betas"]), "max_grad_norm": t["max_grad_norm"],
            "ppo_epochs": t["ppo_epochs"], "mini_batches": t["mini_batches"], "steps": t["max_steps"],
            "seed": job["seed"], "lora_r": ad["r"], "lora_alpha": float(ad["alpha"]), "lora_dropout": ad["dropout"],
            "target_modules": sorted(ad["target_modules"]), "clip_low": a["loss"]["clip_low"],
            "clip_high": a["loss"]["clip_high"], "aggregation": a["aggregation"]["name"],
            "std_scope": a["advantage"]["std_scope"] if a["advantage"]["name"] == "grpo" else a["advantage"]["name"],
            "kl_coef": a["kl"]["coef"], "reward": rewards[0].get("name") if len(rewards) == 1 else rewards,
            "algorithm": a["name"], "loss": a["loss"]["name"], "backend": r["backend"]}


def check_same(expected: dict[str, Any], got: dict[str, Any], arm: str) -> None:
    """Fail loudly unless `got` has every field of `expected` with the same value (floats to 1e-12)."""
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= 1e-12 * max(1, abs(x))
        return x == y
    bad = [f"  {k}: settings {expected[k]!r}, {arm} {got.get(k, '<missing>')!r}"
           for k in expected if k not in got or not same(expected[k], got[k])]
    if bad:
        raise SystemExit(f"vs_trl: {arm} does not run the settings' work; nothing is reported:\n" + "\n".join(bad))


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


def thread_env(s: Settings) -> dict[str, str]:
    return {**child_env(), "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}


def prepare(s: Settings, work: Path, arms: list[str]) -> dict[str, Any]:
    """Resolve rlpost's job and build TRL's trainer; check both against `s`; write TRL's spec. Times nothing."""
    from rl.config import load_job
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model

    job = load_job("quickstart", job_overrides(s, work / "probe"))
    model_dir = str(resolve_model(job.model.path, job.model.cache_dir))
    expected = {**s.compared(), "model_dir": model_dir}
    rlpost = rlpost_view(job.model_dump(mode="json"), model_dir)
    check_same({k: v for k, v in expected.items() if k != "threads"}, rlpost, "rlpost (resolved job)")
    check_same({"algorithm": "grpo", "loss": "ppo_clip", "backend": "hf"}, rlpost, "rlpost (resolved job)")
    env = build_env(job, load_tokenizer(model_dir))
    prompts = [{"text": p.text, "answer": str(p.meta["answer"])} for p in env.train_prompts()]
    spec = work / "spec.json"
    spec.write_text(json.dumps({"settings": dataclasses.asdict(s), "model_dir": model_dir, "prompts": prompts,
                                "out_dir": str(work / "trl-out")}))
    trl = None
    if "trl" in arms:
        out = work / "trl-check.json"
        subprocess.run([str(ensure_trl_venv()), str(TRL_CHILD), "check", str(spec), str(out)], check=True,
                       env=thread_env(s))
        trl = json.loads(out.read_text())["effective"]
        check_same(expected, trl, "TRL (effective GRPOConfig)")
    return {"expected": expected, "spec": spec, "model_dir": model_dir, "rlpost_resolved": rlpost,
            "trl_effective": trl}


def trained_tokens(row: dict[str, Any]) -> int:
    """Tokens under the loss mask in this step (trainers/policy.py `train/tokens`)."""
    return int(row["train/tokens"])


def run_rlpost(s: Settings, work: Path, name: str, rep: int, model_dir: str) -> dict[str, Any]:
    run_dir = work / f"{name}-{rep}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rl.cli", "train", "quickstart", *job_overrides(s, run_dir),
                    *RLPOST_ARMS[name]], check=True, cwd=REPO, env=thread_env(s))
    wall = time.perf_counter() - start
    check_same({k: v for k, v in {**s.compared(), "model_dir": model_dir}.items() if k != "threads"},
               rlpost_view(yaml.safe_load((run_dir / "config.yaml").read_text()), model_dir), f"{name} (config.yaml)")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "time/step_s" in r]
    breakdown = {k: statistics.mean(r[k] for r in rows) for k in
                 ("time/rollout_s", "time/score_s", "time/train_s", "time/weight_sync_s") if all(k in r for r in rows)}
    return {"step_s": [r["time/step_s"] for r in rows], "reward": [r["reward/mean"] for r in rows],
            "generated_tokens": [int(r["rollout/tokens"]) for r in rows],
            "trained_tokens": [trained_tokens(r) for r in rows], "breakdown": breakdown, "wall_s": wall}


def run_trl(s: Settings, prep: dict[str, Any], work: Path, rep: int) -> dict[str, Any]:
    out = work / f"trl-{rep}.json"
    start = time.perf_counter()
    subprocess.run([str(ensure_trl_venv()), str(TRL_CHILD), "train", str(prep["spec"]), str(out)], check=True,
                   env=thread_env(s))
    result = json.loads(out.read_text())
    check_same(prep["expected"], result.pop("effective"), "TRL (config it trained with)")
    return {**result, "wall_s": time.perf_counter() - start}


def summarise(name: str, rep: int, result: dict[str, Any], skip_first: int = 1) -> dict[str, Any]:
    """One arm's run: s/step and s per 1k generated tokens over the steps after the first (warm-up)."""
    timed = slice(skip_first, None) if len(result["step_s"]) > skip_first else slice(None)
    times, gen = result["step_s"][timed], result["generated_tokens"][timed]
    rewards = result["reward"]
    return {"arm": name, "repeat": rep, "s_per_step": statistics.mean(times),
            "s_per_1k_generated_tokens": 1000 * sum(times) / max(sum(gen), 1),
            "generated_tokens_per_step": statistics.mean(gen),
            "trained_tokens_per_step": statistics.mean(result["trained_tokens"][timed]),
            "reward_first": rewards[0] if rewards else None,
            "reward_last_third": statistics.mean(rewards[-max(1, len(rewards) // 3):]) if rewards else None,
            "wall_s": result["wall_s"], "per_step": {k: result[k] for k in
                                                     ("step_s", "reward", "generated_tokens", "trained_tokens")},
            **({"breakdown": result["breakdown"]} if "breakdown" in result else {})}


def ratios(runs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per rlpost arm: median and range over repeats of TRL / arm (s/step; s per 1k generated tokens)."""
    by = {a: sorted((r for r in runs if r["arm"] == a), key=lambda r: r["repeat"]) for a in arms}
    if "trl" not in by:
        return {}
    return {a: {key: spread([t[key] / r[key] for t, r in zip(by["trl"], by[a])])
                for key in ("s_per_step", "s_per_1k_generated_tokens")} for a in arms if a != "trl"}


def table(runs: list[dict[str, Any]], speedups: dict[str, Any], arms: list[str]) -> str:
    lines = [f"{'arm':14s} {'s/step':>8s} {'s/1k gen tok':>12s} {'gen tok/step':>12s} {'trained tok/step':>16s} "
             f"{'reward(last 1/3)':>16s}   (medians over repeats)"]
    for a in arms:
        rs = [r for r in runs if r["arm"] == a]
        med = {k: statistics.median(r[k] for r in rs) for k in ("s_per_step", "s_per_1k_generated_tokens",
                                                                "generated_tokens_per_step", "trained_tokens_per_step",
                                                                "reward_last_third")}
        lines.append(f"{a:14s} {med['s_per_step']:8.2f} {med['s_per_1k_generated_tokens']:12.2f} "
                     f"{med['generated_tokens_per_step']:12.1f} {med['trained_tokens_per_step']:16.1f} "
                     f"{med['reward_last_third']:16.3f}")
    for a, sp in speedups.items():
        st, tk = sp["s_per_step"], sp["s_per_1k_generated_tokens"]
        lines.append(f"TRL / {a}: s/step {st['median']:.2f}x [{st['min']:.2f}-{st['max']:.2f}], "
                     f"s per 1k tokens {tk['median']:.2f}x [{tk['min']:.2f}-{tk['max']:.2f}] over {st['n']} repeats")
    return "\n".join(lines)


def parse() -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for f in ("model", "steps", "group_size", "prompts_per_step", "max_new_tokens", "temperature", "top_p", "lr",
              "seed", "threads", "lora_r"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(defaults, f)), default=getattr(defaults, f))
    p.add_argument("--top-k", type=int, default=None, help="default: no top-k filtering")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of the arms in alternating order (2 = A B B A); ratios: median and range")
    p.add_argument("--arms", default="rlpost,trl", help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--out", default=None, help="JSON file for the result")
    args = p.parse_args()
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    s = dataclasses.replace(defaults, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                                         if hasattr(args, f.name)}, lora_alpha=2.0 * args.lora_r)
    return args, s


def main() -> None:
    args, s = parse()
    arms = [a for a in args.arms.split(",") if a]
    order = abba(arms, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prep = prepare(s, work, arms)  # fails here, before any timing, if the arms differ
        runs, seen = [], {a: 0 for a in arms}
        for arm in order:
            rep, seen[arm] = seen[arm], seen[arm] + 1
            result = run_trl(s, prep, work, rep) if arm == "trl" else run_rlpost(s, work, arm, rep, prep["model_dir"])
            runs.append(summarise(arm, rep, result))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "per_step"}), flush=True)
    speedups = ratios(runs, arms)
    print(table(runs, speedups, arms))
    emit({"benchmark": "vs_trl", "settings": dataclasses.asdict(s), "order": order,
          "checked_equal": {"expected": prep["expected"], "rlpost_resolved": prep["rlpost_resolved"],
                            "trl_effective": prep["trl_effective"]},
          "env": {"OMP_NUM_THREADS": str(s.threads), "trl_packages": TRL_PACKAGES}, "runs": runs,
          "trl_over_rlpost": speedups}, args.out)


if __name__ == "__main__":
    main()
