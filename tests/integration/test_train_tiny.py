"""The real CLI on the tiny job: run-directory contract, exact resume after SIGKILL, Ray == local."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import RL, checkpoint_weights, metrics, rl, stable

REQUIRED = ("step", "reward/mean", "loss", "policy/entropy", "policy/mismatch_kl", "time/step_s", "time/rollout_s",
            "time/train_s", "time/weight_sync_s", "rollout/tokens_per_s", "reward/math_answer/mean")


def test_tiny_run_writes_the_run_directory_contract(tmp_path):
    run = tmp_path / "run"
    done = rl("train", "tiny", f"run_dir={run}", "trainer.max_steps=3", "trainer.eval_every_steps=3",
              "trainer.eval_before_train=true", "trainer.keep_last=2", "logging.wandb.mode=offline")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in REQUIRED:
        assert all(key in r for r in rows[1:]), key
    assert rows[1]["policy/mismatch_kl"] < 1e-4  # the local HF engine samples with the learner's weights
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert (run / "config.yaml").is_file() and (run / "training.png").stat().st_size > 1000
    assert list((run / "wandb").glob("offline-run-*"))  # wandb runs offline without a key
    assert (run / "eval" / "step_0.json").is_file() and (run / "eval" / "step_3.samples.jsonl").is_file()
    assert "held-out accuracy" in done.stdout


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = rl("train", "tiny", f"run_dir={full}", "trainer.max_steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen([*RL, "train", "tiny", f"run_dir={cut}", "trainer.max_steps=6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(cut / "checkpoints" / "step_3", proc)
    os.kill(proc.pid, signal.SIGKILL)  # step 4 is running now
    proc.wait()
    resumed = rl("train", "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert stable(metrics(cut)) == stable(metrics(full))
    a = checkpoint_weights(full / "checkpoints" / "step_6")
    b = checkpoint_weights(cut / "checkpoints" / "step_6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert rl("train", "tiny", f"run_dir={run}", "trainer.max_steps=2").returncode == 0
    weights = sorted((run / "checkpoints" / "step_2" / "policy").glob("*.distcp"))[0]  # a shard of the policy
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = rl("train", "--resume", str(run), "trainer.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping checkpoint" in done.stdout and "step_1" in done.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_cluster_matches_local_in_sync_mode(tmp_path):
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    args = ["trainer.max_steps=3", "trainer.save_every_steps=0"]
    assert rl("train", "tiny", f"run_dir={local}", *args).returncode == 0
    done = rl("train", "tiny", f"run_dir={ray_run}", "cluster={name: ray, rollout_workers: 1, num_cpus: 2}", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = stable(metrics(local)), stable(metrics(ray_run))
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key


def test_rl_train_rejects_bad_input_without_traceback(tmp_path):
    done = rl("train", "tiny", "rollout.group_size=0", f"run_dir={tmp_path / 'r'}")
    assert done.returncode == 2 and "rollout.group_size" in done.stderr and "Traceback" not in done.stderr
    done = rl("train", "--resume", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "not a run directory" in done.stderr


def test_async_mode_overlaps_one_version_behind_and_learns(tmp_path):
    run = tmp_path / "run"
    done = rl("train", "tiny", f"run_dir={run}", "trainer.mode=async", "trainer.max_staleness=1",
              "trainer.max_steps=4", "trainer.save_every_steps=0")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["rollout/policy_lag"] for r in rows] == [0.0, 1.0, 1.0, 1.0]  # step n trains on samples of n-1
    assert all(r["rollout/stale_dropped"] == 0 for r in rows)
    done = rl("train", "tiny", f"run_dir={tmp_path / 'strict'}", "trainer.mode=async", "trainer.max_staleness=0",
              "trainer.max_steps=3", "trainer.save_every_steps=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(tmp_path / "strict")[-1]["rollout/stale_dropped"] == 2.0  # stale batches dropped and counted


USER_REWARD = '''
import time
from rewards import RewardOutput

def brevity(prompt, completion, **fields):
    return RewardOutput(total=1.0 - min(len(completion), 50) / 50, components={"chars": float(len(completion))})

calls = {"n": 0}

def flaky(prompt, completion, **fields):
    calls["n"] += 1
    if calls["n"] == 2:
        time.sleep(30)  # hangs once: killed at the timeout, counted, training continues
    return 0.0
'''


def test_reward_file_outside_the_package_appears_in_metrics(tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_REWARD)
    run = tmp_path / "run"
    rewards = ('rewards=[{name: math_answer}, {import_path: "my_rewards.py:brevity", weight: 0.1}, '
               '{import_path: "my_rewards.py:flaky", timeout_s: 1}]')
    done = rl("train", "tiny", rewards, f"run_dir={run}", "trainer.max_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert all("reward/brevity/mean" in r and "reward/brevity/chars/mean" in r for r in rows)
    assert rows[0]["reward/brevity/chars/mean"] > 0
    assert sum(r["reward/errors/flaky"] for r in rows) >= 1
