"""The built-in lp_reg and rapid jobs through the real CLI (on the tiny model): they run and log their metrics."""

from __future__ import annotations

import pytest
from helpers import metrics, rl

TINY = ["model.path=tiny-llama", "adapter=null", "trainer.save_every_steps=0", "trainer.eval_every_steps=0",
        "trainer.eval_before_train=false", "logging.wandb.mode=disabled", "logging.progress=false",
        "rollout.max_new_tokens=8", "trainer.lr=1e-3"]


@pytest.mark.slow
def test_lp_reg_job_runs_and_protects_tokens(tmp_path):
    run = tmp_path / "run"
    # 8 x 4 samples x <= 8 tokens: tens of negative tokens, so rho = 0.2 selects several per step
    done = rl("train", "lp_reg", *TINY, "rollout.group_size=4", "rollout.prompts_per_step=8", "trainer.max_steps=2",
              "algorithm.loss.neg_fraction=0.2", f"run_dir={run}",
              # the random model never answers right: a dense reward gives the group spread Lp-Reg acts on
              "rewards=[{name: math_answer, weight: 1.0}, {name: digit_fraction, weight: 0.5}]")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)[-2:]
    assert all(r["lp_reg/selected_frac"] > 0 for r in rows)
    assert all("lp_reg/protected_frac" in r and r["policy/entropy"] > 0 for r in rows)


@pytest.mark.slow
def test_rapid_job_runs_several_updates_per_generation(tmp_path):
    run = tmp_path / "run"
    done = rl("train", "rapid", *TINY, "rollout.group_size=4", "rollout.prompts_per_step=4", "trainer.max_steps=2",
              "trainer.mini_batches=2", f"run_dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)[-2:]
    assert [r["train/updates"] for r in rows] == [2.0, 4.0]
    assert all(0 < r["rapid/ess_frac"] <= 1 and 0 < r["rapid/weight_mean"] <= 2 for r in rows)
