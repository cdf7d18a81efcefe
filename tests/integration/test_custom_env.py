"""A user-defined environment in a file outside the package, loaded by `import_path`, trains the tiny job."""

from __future__ import annotations

import json

from helpers import metrics, rl

USER_ENV = '''
from envs.base import render_prompt, stable_id


class RepeatNumber:
    """'Repeat the number n.' for n < kwargs['count']; every prompt carries kwargs['tag'] to the rewards."""

    def __init__(self, cfg, tokenizer, seed):
        tag = cfg.kwargs["tag"]
        prompts = [render_prompt(tokenizer, f"Repeat the number {n}.", cfg.system_prompt, f"{tag}-{n}",
                                 {"answer": str(n), "tag": tag}) for n in range(cfg.kwargs["count"])]
        self._test, self._train = prompts[:cfg.test_size], prompts[cfg.test_size:]

    def train_prompts(self):
        return self._train

    def test_prompts(self):
        return self._test


def env_tag(prompt, completion, tag):
    """1 on every prompt of RepeatNumber built with tag 'kw-reached' (a prompt without `tag` fails the run)."""
    assert "Repeat the number" in prompt
    return 1.0 if tag == "kw-reached" else 0.0
'''


def test_a_user_env_from_a_file_trains_two_steps(tmp_path):
    user = tmp_path / "user_env.py"
    user.write_text(USER_ENV)
    run = tmp_path / "run"
    env = {"name": "custom", "import_path": f"{user}:RepeatNumber", "test_size": 4,
           "kwargs": {"tag": "kw-reached", "count": 20}}
    rewards = [{"import_path": f"{user}:env_tag", "on_error": "fail", "isolate": False}]
    done = rl("train", "tiny", f"run_dir={run}", f"env={json.dumps(env)}", f"rewards={json.dumps(rewards)}",
              "trainer.max_steps=2", "trainer.eval_every_steps=2", "eval.num_prompts=4", "trainer.save_every_steps=0",
              cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    # Trained on the env's prompts: the reward saw their `tag` field, set from the env's kwargs, on every sample.
    assert [r["reward/env_tag/mean"] for r in rows] == [1.0, 1.0]
    records = [json.loads(line) for line in (run / "eval" / "step_2.samples.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in records} == {f"kw-reached-{n}" for n in range(4)}  # its held-out split
