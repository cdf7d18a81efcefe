"""The named pieces of the training loop in rl/loop/driver.py."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rl.batch import RolloutBatch
from rl.loop.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from rl.loop.evaluation import evaluate, write_report
from rl.loop.weights import sync_mode
from rl.registries import ALGORITHMS
from rl.types import SamplingParams

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.loop.par_references import ParReferences
    from rl.loop.runtime import RunParts

SamplerState = Mapping[str, Any]
"""A prompt sampler's `state_dict()` (epoch and cursor), saved with each checkpoint."""


def sampling_params(job: JobConfig, step: int) -> SamplingParams:
    """Per-step sampling with a seed derived from (job seed, step): a resumed run draws the same samples."""
    r = job.rollout
    params = SamplingParams(group_size=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_p=r.top_p, top_k=r.top_k, stop=tuple(r.stop), seed=job.seed * 1_000_003 + step)
    return ALGORITHMS.get(job.algorithm.name).sampling_params(job, params)


def sync_rollout(parts: RunParts, version: int) -> float:
    """Make every rollout worker sample from the learner's current weights; returns seconds."""
    if parts.placement.sync is not None:  # over the weight-sync group (rl/loop/weight_channel.py)
        return parts.placement.sync(version)
    sync = parts.learner.weights(sync_mode(parts.job))
    start = time.perf_counter()
    parts.rollout.load_weights(sync, version)
    return time.perf_counter() - start


class RolloutPipeline:
    """Sync: generate then train. Async: step n+1 is generated while step n trains (one version behind);
    batches older than `max_staleness` versions are dropped, counted, and regenerated."""

    def __init__(self, parts: RunParts, references: ParReferences | None = None) -> None:
        self.parts = parts
        self.references = references
        self.job = parts.job
        self.sampler_state: SamplerState = parts.sampler.state_dict()
        self.is_async = self.job.trainer.mode == "async"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout") if self.is_async else None
        self._pending: Future[tuple[RolloutBatch, dict[str, float], SamplerState]] | None = None
        self.stale_dropped = 0

    def _generate(self, step: int) -> tuple[RolloutBatch, dict[str, float], SamplerState]:
        prompts = self.parts.sampler.next(self.job.rollout.prompts_per_step)
        if self.references is not None:
            prompts = self.references.attach(prompts)
        cursor, selection = self.parts.sampler.state_dict(), self.parts.sampler.last_metrics()
        start = time.perf_counter()
        batch = self.parts.rollout.generate(prompts, sampling_params(self.job, step))
        return batch, {**rollout_metrics(batch, time.perf_counter() - start), **selection}, cursor

    def next_batch(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        if not self.is_async:
            batch, metrics, self.sampler_state = self._generate(step)
            return batch, metrics
        wait_start = time.perf_counter()
        batch, metrics, cursor = (self._pending.result() if self._pending else self._generate(step))
        self._pending = None
        if (step - 1) - batch.policy_version > self.job.trainer.max_staleness:
            self.stale_dropped += 1
            batch, metrics, cursor = self._generate(step)
        self.sampler_state = cursor
        metrics.update({"time/rollout_wait_s": time.perf_counter() - wait_start,
                        "rollout/stale_dropped": float(self.stale_dropped),
                        "rollout/policy_lag": float((step - 1) - batch.policy_version)})
        if step < self.job.trainer.max_steps:
            assert self._executor is not None, "async mode has its rollout thread"
            self._pending = self._executor.submit(self._generate, step + 1)
        return batch, metrics

    def sync_weights(self, version: int) -> dict[str, float]:
        if self._pending is not None:
            self._pending.result()  # never swap weights under a generation in flight
        return {"time/weight_sync_s": sync_rollout(self.parts, version)}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def rollout_metrics(batch: RolloutBatch, seconds: float) -> dict[str, float]:
    from rollout.episodes import episode_metrics

    tokens = float(batch.completion_lengths.sum())
    return {**episode_metrics(batch), "time/rollout_s": seconds, "rollout/tokens": tokens,
            "rollout/tokens_per_s": tokens / max(seconds, 1e-9),
            "rollout/completion_len_mean": tokens / max(batch.num_samples, 1),
            "rollout/truncated_frac": sum(r == "length" for r in batch.finish_reasons) / max(batch.num_samples, 1)}


def _nanmean(v: torch.Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


def score(parts: RunParts, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
    """Rewards for every sample; samples whose group must be dropped (on_error: drop_group) are removed."""
    start = time.perf_counter()
    result = parts.scorer.score(batch)
    batch = batch.with_rewards(result.total, result.components)
    metrics = {"time/score_s": time.perf_counter() - start, "reward/mean": float(result.total.mean()),
               "reward/std": float(result.total.std()) if batch.num_samples > 1 else 0.0}
    for name, values in result.components.items():
        metrics[f"reward/{name}/mean"] = _nanmean(values)
    for name, count in result.errors.items():
        metrics[f"reward/errors/{name}"] = float(count)
    metrics["reward/varied_group_frac"] = varied_group_share(batch)
    if not bool(result.keep.all()):
        metrics["reward/dropped_samples"] = float((~result.keep).sum())
        batch = batch.select(torch.nonzero(result.keep).flatten())
    return batch, metrics


def varied_group_share(batch: RolloutBatch) -> float:
    """Share of groups whose rewards are not all equal: only they get non-zero group-relative advantages
    (the group-level "effective ratio" of PCL, arXiv 2510.01135)."""
    bounds, rewards = batch.group_bounds(), batch.rewards
    assert rewards is not None, "a scored batch"
    varied = sum(bool((rewards[s:e] != rewards[s]).any()) for s, e in bounds)
    return varied / max(len(bounds), 1)


def update_curriculum(parts: RunParts, batch: RolloutBatch) -> dict[str, float]:
    """PCL: the value model learns from this step's prompts and their mean rewards under the policy that
    generated them (after the policy step, as in the paper); nothing for uniform sampling."""
    curriculum = parts.sampler.curriculum
    return curriculum.update(batch) if curriculum is not None and batch.num_samples else {}


def advantages(job: JobConfig, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
    """The batch with [N] or [N, T] advantages, by `algorithm.name` (rl/loop/algorithms.py), and its metrics."""
    return ALGORITHMS.get(job.algorithm.name).advantages(job, batch)


def train(parts: RunParts, batch: RolloutBatch) -> dict[str, float]:
    if batch.num_samples == 0:
        return {"train/skipped_empty": 1.0}
    start = time.perf_counter()
    sleep = parts.job.rollout.backend == "vllm" and parts.job.rollout.vllm.sleep_between_steps
    if sleep:
        parts.rollout.sleep()
    try:
        metrics = dict(parts.learner.train_step(batch))
    finally:
        if sleep:
            parts.rollout.wake()
    metrics["time/train_s"] = time.perf_counter() - start
    return metrics


def step_metrics(started: float, *parts: Mapping[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for p in parts:
        merged.update(p)
    merged["time/step_s"] = time.perf_counter() - started
    return merged


def due(step: int, every: int, max_steps: int) -> bool:
    return every > 0 and (step % every == 0 or step == max_steps)


def evaluate_at(parts: RunParts, run_dir: Path, step: int) -> dict[str, float]:
    job = parts.job
    prompts = list(parts.env.test_prompts())[: job.eval.num_prompts]
    report, records = evaluate(parts.rollout, parts.scorer, prompts, job, seed=job.seed)
    report["step"] = step
    write_report(report, records, Path(run_dir) / "eval" / f"step_{step}.json")
    return {f"eval/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float)) and k != "step"}


def save(parts: RunParts, run_dir: Path, step: int, sampler_state: SamplerState) -> Path:
    """Checkpoint `step`: the learner ranks write the policy's shards, then this process the rest
    (rl/loop/checkpoint.py)."""
    state = {"step": step, "policy_version": step, "sampler": dict(sampler_state), "job": parts.job.name}
    curriculum = parts.sampler.curriculum
    return save_checkpoint(run_dir, step, policy=lambda tmp: parts.learner.save_policy(str(tmp)), state=state,
                           config_yaml=(Path(run_dir) / "config.yaml").read_text(),
                           keep_last=parts.job.trainer.keep_last,
                           curriculum_state=curriculum.state_dict() if curriculum is not None else None)


def restore(parts: RunParts, path: Path) -> int:
    """Load a checkpoint into the learner (at its number of ranks), sampler and RNGs; push its weights to the
    rollout side."""
    payload = load_checkpoint(path)
    parts.learner.load_policy(str(path), payload["trainer_state"])
    parts.sampler.load_state_dict(payload["state"]["sampler"])
    restore_curriculum(parts, payload.get("curriculum"))
    restore_rng(payload["rng"])
    step = int(payload["state"]["step"])
    sync_rollout(parts, version=step)
    return step


def restore_curriculum(parts: RunParts, state: Mapping[str, Any] | None) -> None:
    curriculum = parts.sampler.curriculum
    if curriculum is None:
        return
    if state is None:  # e.g. a curriculum added on resume: its value model starts untrained
        print("checkpoint has no curriculum state: the curriculum's value model starts fresh")
        return
    curriculum.load_state_dict(state)


def print_summary(run_dir: Path, job: JobConfig, last_step: int) -> None:
    """Before/after held-out accuracy when both evaluations exist, and where things were written."""
    before, after = Path(run_dir) / "eval" / "step_0.json", Path(run_dir) / "eval" / f"step_{last_step}.json"
    lines = [f"run finished at step {last_step}: {run_dir}"]
    if before.is_file() and after.is_file() and last_step > 0:
        b, a = json.loads(before.read_text()), json.loads(after.read_text())
        lines.append(f"held-out accuracy (greedy, {a['n']} test prompts): base {b['accuracy']:.1%} -> "
                     f"trained {a['accuracy']:.1%} ({(a['accuracy'] - b['accuracy']) * 100:+.1f} points)")
    if (Path(run_dir) / "training.png").is_file():
        lines.append(f"plot: {Path(run_dir) / 'training.png'}")
    print("\n".join(lines))
