"""`env: {name: custom, import_path: ...}`: user env code is loaded and checked when the job is validated."""

import json
import subprocess
import sys

import pytest

from rl.config import data, load_job
from rl.errors import UserError
from rl.loop.runtime import build_env

USER_ENV = '''
from envs.base import render_prompt, stable_id


class Echo:
    """Fixed questions 'Repeat W' for each of kwargs['words']."""

    def __init__(self, cfg, tokenizer, seed):
        prompts = [render_prompt(tokenizer, f"Repeat {w}", cfg.system_prompt, stable_id("echo", seed, w),
                                 {"answer": w}) for w in cfg.kwargs["words"]]
        self._test, self._train = prompts[:cfg.test_size], prompts[cfg.test_size:]

    def train_prompts(self):
        return self._train

    def test_prompts(self):
        return self._test


def two_arguments(cfg, tokenizer):
    return None


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_env(tmp_path):
    path = tmp_path / "user_env.py"
    path.write_text(USER_ENV)
    return path


def load(env: dict) -> object:
    return load_job("tiny", [f"env={json.dumps(env)}"])


def test_a_user_env_file_loads_and_builds_prompts(user_env, tiny_tokenizer):
    job = load({"name": "custom", "import_path": f"{user_env}:Echo", "test_size": 1,
                "system_prompt": "Be brief.", "kwargs": {"words": ["alpha", "beta", "gamma"]}})
    assert isinstance(job.env, data.CustomEnv) and job.env.kwargs == {"words": ["alpha", "beta", "gamma"]}
    env = build_env(job, tiny_tokenizer)
    assert [p.meta["answer"] for p in env.test_prompts()] == ["alpha"]
    assert [p.meta["question"] for p in env.train_prompts()] == ["Repeat beta", "Repeat gamma"]
    prompt = env.train_prompts()[0]
    assert "Be brief." in prompt.text and tiny_tokenizer.decode(list(prompt.token_ids)) == prompt.text


def test_a_relative_file_path_is_resolved_and_written_absolute(user_env, monkeypatch):
    monkeypatch.chdir(user_env.parent)
    job = load({"name": "custom", "import_path": "user_env.py:Echo", "kwargs": {"words": ["a"]}})
    assert job.env.import_path == f"{user_env.resolve()}:Echo"


@pytest.mark.parametrize(("attr", "problem"), [
    ("Missing", "defines no 'Missing'"),
    ("two_arguments", r"must accept \(cfg, tokenizer, seed\)"),
    ("NOT_CALLABLE", "is a int, not a function or class"),
])
def test_bad_user_env_is_a_user_error_at_env(user_env, attr, problem):
    with pytest.raises(UserError, match=rf"(?s)  env: .*{problem}"):
        load({"name": "custom", "import_path": f"{user_env}:{attr}"})


def test_missing_file_and_malformed_path_are_user_errors_at_env(tmp_path):
    with pytest.raises(UserError, match=r"(?s)  env.import_path: custom code file not found: 'nowhere.py'"):
        load({"name": "custom", "import_path": "nowhere.py:Echo"})
    with pytest.raises(UserError, match=r"  env.import_path: import_path 'no_colon' must look like"):
        load({"name": "custom", "import_path": "no_colon"})
    with pytest.raises(UserError, match=r"  env: cannot import 'no_such_pkg_xyz'|  env: .*cannot import"):
        load({"name": "custom", "import_path": "no_such_pkg_xyz.mod:Echo"})
    with pytest.raises(UserError, match=r"  env.import_path: Field required"):
        load({"name": "custom"})


def test_bad_user_env_exits_2_at_the_cli_without_a_traceback(user_env, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"env": {"name": "custom", "import_path": f"{user_env}:two_arguments"}}))
    done = subprocess.run([sys.executable, "-m", "rl.cli", "validate", str(job)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "env:" in done.stderr and "must accept (cfg, tokenizer, seed)" in done.stderr
