"""`algorithm: {name: grpo_ma}` through the real CLI on the tiny model: a valid run whose metrics carry
GRPO-MA's figures, K*M samples per prompt, and a resolved config that round-trips."""

import math

import yaml
from helpers import metrics, rl


def test_grpo_ma_tiny_run_logs_its_metrics(tmp_path):
    run = tmp_path / "run"
    # "e" is a delimiter the random tiny model reaches in some of its 24-token thoughts
    done = rl("train", "tiny", f"run_dir={run}", "trainer.max_steps=2", "rollout.max_new_tokens=24",
              "algorithm={name: grpo_ma, thoughts: 3, answers_per_thought: 2, thought_delimiter: e, "
              "answer_max_new_tokens: 4}", "rewards=[{name: digit_fraction}]")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("grpo_ma/complete_frac", "grpo_ma/thought_value_std", "grpo_ma/thought_adv_noise_var",
                    "grad_norm", "loss", "reward/mean"):
            assert key in r, key
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert 0.0 <= r["grpo_ma/complete_frac"] <= 1.0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["algorithm"]["name"] == "grpo_ma" and config["algorithm"]["answers_per_thought"] == 2
