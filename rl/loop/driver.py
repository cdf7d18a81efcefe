"""`rl train`: the RL loop. One page; the details live in rl/loop/steps.py.

    for step in 1..max_steps:
        prompts  = sampler.next(prompts_per_step)         # curriculum (PCL): best of a larger pool
        batch    = rollout.generate(prompts)              # RolloutBatch, policy_version stamped
        batch    = score(batch)                           # rewards (+ components), failed groups dropped
        batch    = advantages(batch)                      # group-relative
        metrics  = learner.train_step(batch)              # ppo_epochs x mini_batches optimizer steps
        curriculum.update(batch)                          # PCL: value model learns mean group rewards
        sync     = push weights to the rollout workers    # version = step
        log, evaluate, checkpoint
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from rl.config import dump_job, load_job
from rl.errors import UserError
from rl.loop import distributed, steps
from rl.loop.checkpoint import latest_intact_checkpoint
from rl.loop.metrics import MetricsLogger, plot_run
from rl.loop.runtime import build_run
from rl.loop.shutdown import graceful_shutdown
from rl.swarm.node import build_swarm

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.loop.runtime import RunParts


def train_job(job: JobConfig) -> int:
    launch = distributed.launched()
    if launch is not None and launch.rank > 0:  # torchrun/srun: ranks 1..N-1 serve rank 0's learner calls
        return distributed.follow_launch(job, launch)
    run_dir = Path(job.resolved_run_dir)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already holds checkpoints of a run. Continue it with "
                        f"`rl train --resume {run_dir}`, or set run_dir to a new directory.")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_job(job, run_dir / "config.yaml")
    return run(job, run_dir, checkpoint=None)


def resume_job(run_dir: str, overrides: Sequence[str] = ()) -> int:
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give the run_dir of a previous run.")
    job = load_job(str(path / "config.yaml"), list(overrides))
    launch = distributed.launched()
    if launch is not None and launch.rank > 0:  # rank 0 restores the checkpoint; the learner calls reach us
        return distributed.follow_launch(job, launch)
    ckpt = latest_intact_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{run_dir} has no intact checkpoint to resume from; start the job again with rl train.")
    print(f"resuming from {ckpt.path} (step {ckpt.step})")
    return run(job, path, checkpoint=ckpt.path)


def run(job: JobConfig, run_dir: Path, checkpoint: Path | None) -> int:
    parts = build_run(job)
    try:
        start = steps.restore(parts, checkpoint) if checkpoint else 0
        logger = MetricsLogger(run_dir, job, job.trainer.max_steps, start_step=start)
        try:
            last = loop(parts, run_dir, logger, start)
        finally:
            logger.close()
    finally:
        parts.close()
    plot_run(run_dir)
    steps.print_summary(run_dir, job, last)
    return 0


def loop(parts: RunParts, run_dir: Path, logger: MetricsLogger, start: int) -> int:
    job = parts.job
    pipeline = steps.RolloutPipeline(parts)
    swarm = build_swarm(job)  # SAPO (swarm: null -> a no-op)
    # closed on any way out, a checkpoint that fails on a full disk included: no generation is left running
    with graceful_shutdown() as stop, closing(swarm), closing(pipeline):
        if job.trainer.eval_before_train and start == 0:
            logger.log(0, steps.evaluate_at(parts, run_dir, 0))
        step = start
        for step in range(start + 1, job.trainer.max_steps + 1):
            started = time.perf_counter()
            batch, rollout_metrics = pipeline.next_batch(step)
            batch, score_metrics = steps.score(parts, batch)
            batch, swarm_metrics = swarm.exchange(parts, batch, step)
            batch, adv_metrics = steps.advantages(job, batch)
            train_metrics = steps.train(parts, batch)
            curriculum_metrics = steps.update_curriculum(parts, batch)     # PCL value model: on-policy targets
            sync_metrics = pipeline.sync_weights(version=step)
            metrics = steps.step_metrics(started, rollout_metrics, score_metrics, swarm_metrics, adv_metrics,
                                         train_metrics, curriculum_metrics, sync_metrics)
            if steps.due(step, job.trainer.eval_every_steps, job.trainer.max_steps):
                metrics.update(steps.evaluate_at(parts, run_dir, step))
            logger.log(step, metrics)
            if stop.requested or steps.due(step, job.trainer.save_every_steps, job.trainer.max_steps):
                steps.save(parts, run_dir, step, pipeline.sampler_state)
            if stop.requested:
                logger.note(f"stopped after step {step} ({stop.requested}); continue with: rl train --resume {run_dir}")
                break
    return step
