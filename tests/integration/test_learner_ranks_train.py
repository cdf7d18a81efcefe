"""`rl train` with 2 learner ranks (issue 22), through the real CLI on the tiny job: the same run as 1 rank,
launched here or by torchrun, and a killed rank that ends the run cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import RL, metrics, rl

# `auto` correction resolves by whether the sampler is the learner, which it is with 1 local rank and never with 2
PINNED = ["trainer.max_steps=4", "algorithm.correction.level=token", "trainer.save_every_steps=2"]


def _per_step(run: Path) -> list[dict]:
    return [{k: row[k] for k in ("step", "loss", "reward/mean", "grad_norm", "policy/entropy", "train/tokens")}
            for row in metrics(run)]


def _same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], rel=1e-5)  # same samples: same weights
        assert x["train/tokens"] == y["train/tokens"]
        for key in ("grad_norm", "policy/entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], key)
        # GRPO's token-mean loss is ~1e-8 here (advantages sum to ~0 within each group): relative error of a
        # cancellation is meaningless, so it is compared on the scale of its terms (|A| ~ 1)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]


@pytest.mark.slow
def test_two_ranks_train_like_one(tmp_path: Path) -> None:
    runs = {}
    for n in (1, 2):
        out = rl("train", "tiny", f"cluster.learners={n}", f"run_dir={tmp_path / str(n)}", *PINNED)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[n] = _per_step(tmp_path / str(n))
    _same_run(runs[2], runs[1])


@pytest.mark.slow
def test_torchrun_launch_trains_like_the_local_ranks(tmp_path: Path) -> None:
    local = tmp_path / "local"
    assert rl("train", "tiny", "cluster.learners=2", f"run_dir={local}", *PINNED).returncode == 0
    launched = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rl.cli", "train", "tiny", "cluster.learners=2", f"run_dir={launched}", *PINNED]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    _same_run(_per_step(launched), _per_step(local))


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_processes(driver: int) -> list[int]:
    """The driver's learner-rank children (multiprocessing spawn: `... spawn_main ...` in their command line)."""
    ranks = []
    for child in _children(driver):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                ranks.append(child)
        except OSError:
            continue
    return ranks


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_a_message_and_it_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([*RL, "train", "tiny", "cluster.learners=2", f"run_dir={run}", "trainer.max_steps=40",
                             "trainer.save_every_steps=1", "cluster.collective_timeout_s=60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    (rank1,) = _rank_processes(proc.pid)
    os.kill(rank1, signal.SIGKILL)  # a real dead rank, mid-run
    started = time.time()
    _, err = proc.communicate(timeout=120)  # well within the collective timeout: the dead peer is noticed at once
    assert proc.returncode == 2, err[-3000:]
    assert "learner rank" in err and "rl train --resume" in err, err[-2000:]
    assert time.time() - started < 60
    assert not _rank_processes(proc.pid) if proc.poll() is None else True
    resumed = rl("train", "--resume", str(run), "trainer.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
