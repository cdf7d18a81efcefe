"""Async training on the transformers backend is off-policy by one version: the real CLI run must resolve
`correction.level: auto` to token TIS and apply the weights from the second step on."""

from __future__ import annotations

import yaml
from helpers import metrics, rl


def test_async_hf_run_weights_the_stale_samples(tmp_path):
    run = tmp_path / "run"
    done = rl("train", "tiny", f"run_dir={run}", "trainer.mode=async", "trainer.max_steps=4",
              "trainer.save_every_steps=0")
    assert done.returncode == 0, done.stderr[-3000:]
    written = yaml.safe_load((run / "config.yaml").read_text())["algorithm"]["correction"]
    assert written["level"] == "token", written  # `auto` resolved, and visible in the run directory
    rows = [r for r in metrics(run) if "policy/mismatch_kl" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first, later = rows[0], rows[1:]
    # Step 1 is sampled by the initial weights, which the learner still holds: no mismatch, weights 1.
    assert first["policy/mismatch_kl"] < 1e-6 and abs(first["policy/tis_weight_mean"] - 1) < 1e-4
    for row in later:  # sampled one version behind the learner that trains on it
        assert row["rollout/policy_lag"] == 1
        assert row["policy/mismatch_kl"] > 1e-5, row
        assert abs(row["policy/tis_weight_mean"] - 1) > 1e-5, row  # the TIS weights are applied (1 with none)
