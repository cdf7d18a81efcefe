import subprocess
import sys
import time
from pathlib import Path

import pydantic
import pytest
import yaml

from rl.config import apply_overrides, builtin_jobs, dump_job, load_job
from rl.errors import UserError

RL = [sys.executable, "-m", "rl.cli"]


def run_rl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("name", sorted(builtin_jobs()))
def test_every_builtin_job_validates(name):
    done = run_rl("validate", name)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_broken_job_reports_every_bad_key_path(tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text(yaml.safe_dump({
        "name": "broken",
        "rollout": {"group_size": -2, "max_new_token": 5},
        "trainer": {"lr": "fast"},
        "algorithm": {"loss": {"name": "gsop"}},
        "rewards": [{"import_path": "missing_rewards.py:score"}],
    }))
    done = run_rl("validate", str(job), cwd=tmp_path)
    assert done.returncode == 2
    err = done.stderr
    assert "Traceback" not in err
    for key in ("rollout.group_size", "rollout.max_new_token", "trainer.lr", "algorithm.loss",
                "rewards[0].import_path"):
        assert key in err, (key, err)
    assert "unknown key" in err and "'gsop'" in err and "missing_rewards.py" in err


def test_bad_yaml_and_unknown_job_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrollout: {group_size: 4\n")
    done = run_rl("validate", str(bad))
    assert done.returncode == 2 and "not valid YAML at line" in done.stderr and "Traceback" not in done.stderr
    done = run_rl("validate", "no_such_job")
    assert done.returncode == 2 and "Built-in jobs" in done.stderr


def test_overrides_set_nested_keys_with_yaml_types():
    data = apply_overrides({"trainer": {"lr": 1.0}}, ["trainer.max_steps=5", 'rollout.stop=["\\n"]',
                                                      "adapter=null", "name=abc"])
    assert data == {"trainer": {"lr": 1.0, "max_steps": 5}, "rollout": {"stop": ["\n"]}, "adapter": None,
                    "name": "abc"}
    with pytest.raises(UserError, match=r"key\.path=value"):
        apply_overrides({}, ["novalue"])


def test_overrides_reach_list_entries_by_index():
    data = {"rewards": [{"name": "math_answer"}, {"name": "reward_model", "path": "a"}]}
    assert apply_overrides(data, ["rewards.1.path=b", "rewards.0.weight=0.0"])["rewards"] == [
        {"name": "math_answer", "weight": 0.0}, {"name": "reward_model", "path": "b"}]
    with pytest.raises(UserError, match=r"'2' is not an index of a list of 2 entries"):
        apply_overrides(data, ["rewards.2.path=c"])


def test_resolved_config_roundtrips_and_is_frozen(tmp_path):
    job = load_job("quickstart", ["trainer.max_steps=7"])
    assert job.trainer.max_steps == 7 and job.adapter.name == "lora"
    dump_job(job, tmp_path / "config.yaml")
    again = load_job(str(tmp_path / "config.yaml"))
    assert again == job
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        job.trainer.lr = 1.0  # type: ignore[misc]


def test_variant_fields_belong_to_their_variant():
    with pytest.raises(UserError, match=r"algorithm\.loss\.clip_low"):
        load_job("tiny", ["algorithm.loss={name: reinforce, clip_low: 0.2}"])


def test_rl_help_is_fast():
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "rl"), "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "train" in done.stdout
    assert elapsed < 2.0, f"rl --help took {elapsed:.2f}s"
