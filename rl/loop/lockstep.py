"""N SAPO nodes in one process, in lock-step rounds (memory transport): the controlled setting.

    for step in 1..max_steps:
        for node: generate -> score -> publish          # every node's round-`step` rollouts are out
        for node: collect -> mix I+J -> advantages -> train -> sync -> log

Each node is a full run (its own model, sampler, scorer, learner, run directory and metrics.jsonl),
built and stepped with the same pieces as rl/loop/driver.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rl.config import dump_job
from rl.errors import UserError
from rl.loop import steps
from rl.loop.metrics import MetricsLogger
from rl.loop.runtime import build_run
from rl.swarm.node import SwarmNode
from rl.swarm.transports import reset_memory_board

if TYPE_CHECKING:
    from rl.batch import RolloutBatch
    from rl.config.job import JobConfig


class LockstepNode:
    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.run_dir = Path(job.resolved_run_dir)
        if (self.run_dir / "metrics.jsonl").exists():
            raise UserError(f"{self.run_dir} already holds a run; choose a new run_dir.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_job(job, self.run_dir / "config.yaml")
        self.parts = build_run(job)
        self.pipeline = steps.RolloutPipeline(self.parts)
        self.swarm = SwarmNode(job)
        self.logger = MetricsLogger(self.run_dir, job, job.trainer.max_steps)
        self._batch: RolloutBatch | None = None  # this round's scored own batch, from generate() to train()
        self._metrics: dict[str, float] = {}

    def generate(self, step: int) -> None:
        started = time.perf_counter()
        batch, rollout_metrics = self.pipeline.next_batch(step)
        self._batch, score_metrics = steps.score(self.parts, batch)
        published = self.swarm.publish(self._batch, step)
        self._metrics = {**rollout_metrics, **score_metrics, **published,
                         "time/generate_phase_s": time.perf_counter() - started}

    def train(self, step: int) -> None:
        started = time.perf_counter()
        assert self._batch is not None, "generate() runs before train() each round"
        batch, swarm_metrics = self.swarm.mix(self.parts, self._batch, step)
        batch, adv_metrics = steps.advantages(self.job, batch)
        train_metrics = steps.train(self.parts, batch)
        curriculum_metrics = steps.update_curriculum(self.parts, batch)
        sync_metrics = self.pipeline.sync_weights(version=step)
        metrics = steps.step_metrics(started, self._metrics, swarm_metrics, adv_metrics, train_metrics,
                                     curriculum_metrics, sync_metrics)
        metrics["time/step_s"] += self._metrics["time/generate_phase_s"]
        if steps.due(step, self.job.trainer.eval_every_steps, self.job.trainer.max_steps):
            metrics.update(steps.evaluate_at(self.parts, self.run_dir, step))
        self.logger.log(step, metrics)
        if steps.due(step, self.job.trainer.save_every_steps, self.job.trainer.max_steps):
            steps.save(self.parts, self.run_dir, step, self.pipeline.sampler_state)

    def close(self) -> None:
        self.pipeline.close()
        self.swarm.close()
        self.logger.close()
        self.parts.close()


def run_lockstep(jobs: Sequence[JobConfig], leave_after: dict[int, int] | None = None) -> list[Path]:
    """Run the nodes' jobs (all `swarm.transport: memory` on one board) in lock-step; their run dirs.

    leave_after: {node index: step} - that node stops after the step (a peer leaving the swarm).
    """
    boards = {j.swarm.transport.board for j in jobs if j.swarm is not None and j.swarm.transport.name == "memory"}
    if len(boards) != 1 or any(j.swarm is None for j in jobs):
        raise UserError("a lock-step swarm needs every node's job with swarm.transport.name=memory on one board")
    reset_memory_board(boards.pop())
    leave_after = leave_after or {}
    nodes: list[LockstepNode] = []
    try:
        for job in jobs:
            nodes.append(LockstepNode(job))
        for step in range(1, max(j.trainer.max_steps for j in jobs) + 1):
            live = [(i, n) for i, n in enumerate(nodes)
                    if step <= min(n.job.trainer.max_steps, leave_after.get(i, 10**9))]
            for _, node in live:
                node.generate(step)
            for _, node in live:
                node.train(step)
    finally:
        for node in nodes:
            node.close()
    return [n.run_dir for n in nodes]
