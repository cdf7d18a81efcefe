"""Preemption and dead workers, through the real CLI on the tiny job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import RL, metrics, rl, stable


def _wait(predicate, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_checkpoints_exits_zero_and_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["trainer.max_steps=6", "trainer.save_every_steps=0"]  # only the final (or preemption) save
    assert rl("train", "tiny", f"run_dir={full}", *args).returncode == 0
    proc = subprocess.Popen([*RL, "train", "tiny", f"run_dir={cut}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: _steps_logged(cut) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"rl train --resume {cut}" in (out + err)
    saved = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] != "step_6"
    resumed = rl("train", "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert stable(metrics(cut)) == stable(metrics(full))


def _rollout_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if cmdline.startswith(("ray::RolloutHost", "ray::SyncRolloutHost")):  # collective sync: the latter
                pids.append(int(proc.name))
    return pids


@pytest.mark.ray
@pytest.mark.slow
def test_killed_ray_rollout_worker_is_restarted_and_the_run_completes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([*RL, "train", "tiny", f"run_dir={run}", "trainer.max_steps=6",
                             "cluster={name: ray, rollout_workers: 2, num_cpus: 2, call_timeout_s: 120}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _steps_logged(run) >= 2 and len(_rollout_worker_pids()) == 2, proc)
    os.kill(_rollout_worker_pids()[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert "restarting it and re-issuing" in err
