"""The real CLI on the tiny job with `agent.verifiers`: a single-turn, a multi-turn and a tool `verifiers` environment
(tests/unit/rollout/verifiers_envs.py: verifiers' own SingleTurnEnv / MultiTurnEnv / ToolEnv, loaded from the job)
train for 2 steps through the rollout worker's chat-completions endpoint; the prompts are the env's dataset, the
reward its rubric's score (the built-in `verifiers` reward), the trained tokens the served ones; `rl eval` runs its
episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import metrics, rl

ENVS = Path(__file__).parents[1] / "unit" / "rollout" / "verifiers_envs.py"


def _job(tmp_path: Path, kind: str) -> Path:
    job = yaml.safe_load((Path(__file__).parents[2] / "rl" / "jobs" / "tiny.yaml").read_text())
    job.update(name=f"tiny_verifiers_{kind}", rewards=[{"name": "verifiers"}],
               agent={"max_turns": 4, "verifiers": {"env": str(ENVS), "kwargs": {"kind": kind, "size": 16},
                                                    "concurrency": 8, "timeout_s": 60}})
    job["rollout"]["max_new_tokens"] = 6
    job["rollout"]["max_prompt_tokens"] = 960  # a tool env's prompt describes its tools
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# tool: vf.ToolEnv's tools go to the endpoint as OpenAI `tools` (the random tiny model calls none, so 1 turn;
# tests/unit/rollout/test_verifiers_rollout.py drives a served call through the env's tool)
@pytest.mark.parametrize(("kind", "turns"), [("single", 1), ("multi", 3), ("tool", 1)])
def test_a_verifiers_env_trains_for_two_steps_through_the_endpoint(tmp_path: Path, kind: str, turns: int):
    job = _job(tmp_path, kind)
    run_dir = tmp_path / "run"
    done = rl("train", str(job), f"run_dir={run_dir}", "trainer.max_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # 8 episodes of `turns` served replies of at most 6 tokens; the learner trains on those only
        assert r["agent/turns_mean"] == turns, r
        assert 0 < r["train/tokens"] == r["rollout/tokens"] <= 8 * turns * 6, r
        assert r["grad_norm"] > 0 and r["reward/errors/verifiers"] == 0, r
        assert 0 < r["reward/verifiers/mean"] <= 1.5, r  # exact (w 1) + 0.5 x brevity: brevity > 0 always
    if kind == "multi":
        report = tmp_path / "eval.json"
        evaluated = rl("eval", str(run_dir / "checkpoints" / "step_2"), "--job", str(job), "--num-prompts", "4",
                       "--out", str(report), cwd=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads(report.read_text())["n"] == 4
        samples = [json.loads(line) for line in report.with_name("eval.samples.jsonl").read_text().splitlines()]
        assert len(samples) == 4 and all("go on 1" in s["completion"] for s in samples)  # the env's 3 turns
