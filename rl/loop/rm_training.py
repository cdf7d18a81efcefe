"""`rl train-rm`: a Bradley-Terry reward-model run, with the platform's checkpoints, metrics and resume.

    RUN_DIR/config.yaml              the resolved job (what --resume reads)
    RUN_DIR/metrics.jsonl            loss, train/accuracy, grad_norm per step; eval/* when evaluated
    RUN_DIR/eval/step_<N>.json       held-out pairwise accuracy, loss and margin
    RUN_DIR/checkpoints/step_<N>/    rl/loop/checkpoint.py's atomic checkpoint: reward_model/ (the Hugging Face
                                     classifier, LoRA merged, + tokenizer: rl.models.load_reward_model loads it),
                                     weights.safetensors (the trained tensors), trainer.pt (AdamW), rng.pt, state.json
    RUN_DIR/export/                  the final reward model, for `rewards: [{name: reward_model, path: ...}]`

The data order is a function of (seed, step) (trainers/reward_model/data.py), so a resumed run continues with
the very pairs, weights and optimizer moments an uninterrupted run would have at that step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from rl.config import load_rm_job
from rl.config.reward_model_job import RewardModelJob
from rl.errors import UserError
from rl.loop.checkpoint import (
    latest_intact_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    single_file_weights,
    weights_writer,
)
from rl.loop.metrics import MetricsLogger, plot_run
from rl.models import REWARD_MODEL_DIR
from trainers.reward_model.data import Pair, batch_indices, load_split, steps_per_epoch
from trainers.reward_model.model import (
    build_reward_model,
    evaluate,
    export_reward_model,
    load_trainable_state,
    train_step,
    trainable_state,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


EXPORT_DIR = "export"


@dataclass
class RMRun:
    """What a run holds between steps."""

    job: RewardModelJob
    run_dir: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    train: list[Pair]
    test: list[Pair]
    step: int = 0

    @property
    def total_steps(self) -> int:
        cfg = self.job.train
        return cfg.max_steps or cfg.epochs * steps_per_epoch(len(self.train), cfg.batch_size)


def train_rm_job(job: RewardModelJob) -> int:
    run_dir = Path(job.resolved_run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already holds checkpoints of a run. Continue it with "
                        f"`rl train-rm --resume {run_dir}`, or set run_dir to a new directory.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(job_yaml(job))
    return run(job, run_dir, checkpoint=None)


def resume_rm_job(run_dir: str, overrides: Sequence[str] = ()) -> int:
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give the run_dir of a previous "
                        "`rl train-rm` run.")
    job = load_rm_job(str(path / "config.yaml"), list(overrides))
    ckpt = latest_intact_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{run_dir} has no intact checkpoint to resume from; start the job again with rl train-rm.")
    print(f"resuming from {ckpt.path} (step {ckpt.step})")
    return run(job, path, checkpoint=ckpt.path)


def job_yaml(job: RewardModelJob) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)


def _device(asked: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if asked == "auto" else asked


def build_run(job: RewardModelJob, run_dir: Path) -> RMRun:
    train, test = load_split(job.data, job.train.seed)
    model, tokenizer = build_reward_model(job, _device(job.train.device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.train.lr, weight_decay=job.train.weight_decay)
    return RMRun(job, run_dir, model, tokenizer, optimizer, train, test)


def restore(state: RMRun, checkpoint: Path) -> None:
    """Weights, optimizer moments, RNG and step of a verified checkpoint."""
    saved = load_checkpoint(checkpoint)
    weights = single_file_weights(checkpoint)
    if weights is None:
        raise UserError(f"{checkpoint} holds no reward-model weights (weights.safetensors); is it an `rl train` "
                        "checkpoint? Resume an `rl train-rm` run directory.")
    load_trainable_state(state.model, weights)
    state.optimizer.load_state_dict(saved["trainer_state"]["optimizer"])
    restore_rng(saved["rng"])
    state.step = int(saved["state"]["step"])


def run(job: RewardModelJob, run_dir: Path, checkpoint: Path | None) -> int:
    state = build_run(job, run_dir)
    if checkpoint is not None:
        restore(state, checkpoint)
    logger = MetricsLogger(run_dir, job, state.total_steps, start_step=state.step)
    try:
        train_loop(state, logger)
    finally:
        logger.close()
    export(state)
    plot_run(run_dir)
    print(f"reward model trained to step {state.step}: {run_dir}\n  held-out: {_last_eval(run_dir, state.step)}\n"
          f"  export: {run_dir / EXPORT_DIR} (use it as `rewards: [{{name: reward_model, path: "
          f"{run_dir / EXPORT_DIR}}}]`)")
    return 0


def train_loop(state: RMRun, logger: MetricsLogger) -> None:
    cfg = state.job.train
    while state.step < state.total_steps:
        started = time.perf_counter()
        pairs = [state.train[i] for i in batch_indices(state.step, len(state.train), cfg.batch_size, cfg.seed)]
        metrics = train_step(state.model, state.tokenizer, state.optimizer, pairs, cfg.max_length, cfg.max_grad_norm)
        state.step += 1
        metrics |= {"lr": cfg.lr, "time/step_s": time.perf_counter() - started}
        last = state.step == state.total_steps
        if last or (cfg.eval_every and state.step % cfg.eval_every == 0):
            metrics |= held_out(state)
        logger.log(state.step, metrics)
        if last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            write_checkpoint(state)
    if not (state.run_dir / "eval" / f"step_{state.step}.json").is_file():  # resumed at the end: nothing ran
        held_out(state)
        write_checkpoint(state)


def held_out(state: RMRun) -> dict[str, float]:
    """Held-out metrics, also written as RUN_DIR/eval/step_<N>.json."""
    cfg = state.job.train
    metrics = evaluate(state.model, state.tokenizer, state.test, cfg.max_length, cfg.batch_size)
    out = state.run_dir / "eval" / f"step_{state.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"step": state.step, "job": state.job.name, "n": len(state.test),
              **{k.removeprefix("eval/"): v for k, v in metrics.items()}}
    out.write_text(json.dumps(report, indent=1))
    return metrics


def write_checkpoint(state: RMRun) -> Path:
    weights = weights_writer(trainable_state(state.model), {"optimizer": state.optimizer.state_dict()})

    def policy(tmp: Path) -> dict[str, object]:
        export_reward_model(state.model, state.tokenizer, str(tmp / REWARD_MODEL_DIR))
        return dict(weights(tmp))

    return save_checkpoint(state.run_dir, state.step, policy=policy, config_yaml=job_yaml(state.job),
                           state={"step": state.step, "train_pairs": len(state.train), "test_pairs": len(state.test)},
                           keep_last=state.job.train.keep_last, command="rl train-rm", keep_key="train.keep_last")


def export(state: RMRun) -> Path:
    """RUN_DIR/export: written beside and renamed into place, so a crash never leaves half an export."""
    final = state.run_dir / EXPORT_DIR
    tmp = state.run_dir / f".{EXPORT_DIR}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_reward_model(state.model, state.tokenizer, str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _last_eval(run_dir: Path, step: int) -> str:
    report = json.loads((run_dir / "eval" / f"step_{step}.json").read_text())
    return f"pairwise accuracy {report['accuracy']:.1%}, loss {report['loss']:.4f} on {report['n']} pairs"
