"""The real CLI on the tiny job with `agent:` (tools: calculator, python): episodes go through the training loop,
its metrics, checkpoints, exact resume after SIGKILL and `rl eval`. The random tiny model never writes a tool call,
so `agent.prefill` starts every episode with a whole calculator call: the calculator really runs, its answer is
context and the model takes a second turn, in training, after the resume and in eval.
(tests/unit/rollout/test_episodes.py drives 3-turn episodes over both engines.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from helpers import RL, metrics, rl, stable

AGENT = {"tools": [{"name": "calculator"}, {"name": "python", "timeout_s": 5}], "max_turns": 3,
         "max_total_tokens": 256,  # the tiny model's tokenizer spends ~80 tokens on the prefill
         "prefill": '<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>'}


def _job(tmp_path: Path) -> Path:
    job = yaml.safe_load((Path(__file__).parents[2] / "rl" / "jobs" / "tiny.yaml").read_text())
    job.update(name="tiny_agent", agent=AGENT)
    job["rollout"]["max_prompt_tokens"] = 2048  # the tools' description makes the prompts longer
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_an_agent_job_trains_resumes_exactly_and_evaluates(tmp_path):
    job = _job(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = rl("train", str(job), f"run_dir={full}", "trainer.max_steps=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(full)
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 4  # every episode: the prefilled call, its answer, a second model turn
    assert all(r["agent/tool_calls_mean"] >= 1 and r["agent/turns_mean"] >= 2 for r in steps), steps
    assert all(r["agent/tool_errors_mean"] == 0 for r in steps)  # the calculator answered every call
    proc = subprocess.Popen([*RL, "train", str(job), f"run_dir={cut}", "trainer.max_steps=4"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "step_2").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = rl("train", "--resume", str(cut), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert stable(metrics(cut)) == stable(metrics(full))
    report = tmp_path / "eval.json"
    evaluated = rl("eval", str(full / "checkpoints" / "step_4"), "--job", str(job), "--num-prompts", "8",
                   "--out", str(report), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert report.is_file() and yaml.safe_load(report.read_text())["n"] == 8
