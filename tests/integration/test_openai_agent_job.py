"""The real CLI on the tiny job with `agent.openai_agent`: an agent written against the `openai` client (2 turns per
episode) trains for 2 steps through the rollout worker's chat-completions endpoint, its metrics are written, and a
second run samples and trains the same (the agents' threads and engine-call batching do not change the episodes);
`rl eval` of its checkpoint runs the agent's episodes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import metrics, rl, stable

AGENT_FILE = '''
import openai


def run(client: openai.OpenAI, question: str, fields: dict) -> None:
    messages = [{"role": "user", "content": question}]
    for turn in range(2):
        reply = client.chat.completions.create(model="anything", messages=messages, max_tokens=6)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        messages.append({"role": "user", "content": "Check it and give the final answer."})
'''


def test_an_openai_client_agent_trains_for_two_steps(tmp_path: Path):
    (tmp_path / "my_agent.py").write_text(AGENT_FILE)
    job = yaml.safe_load((Path(__file__).parents[2] / "rl" / "jobs" / "tiny.yaml").read_text())
    job.update(name="tiny_openai_agent",
               agent={"max_turns": 3, "openai_agent": {"import_path": "my_agent.py:run", "concurrency": 8,
                                                        "timeout_s": 60}})
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    done = rl("train", str(path), f"run_dir={run_dir}", "trainer.max_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["agent/turns_mean"] == 2 for r in rows), rows  # every episode: the agent's 2 completions
    for r in rows:  # 8 episodes of 2 served replies of at most 6 tokens; the learner trains on those tokens only
        assert 0 < r["train/tokens"] == r["rollout/tokens"] <= 8 * 2 * 6, r
        assert r["grad_norm"] > 0 and r["reward/errors/math_answer"] == 0
    report = tmp_path / "eval.json"  # `rl eval` runs the agent's episodes too (greedy)
    evaluated = rl("eval", str(run_dir / "checkpoints" / "step_2"), "--job", str(path), "--num-prompts", "4",
                   "--out", str(report), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(report.read_text())["n"] == 4
    samples = [json.loads(line) for line in report.with_name("eval.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("Check it and give the final answer." in s["completion"] for s in samples)
    again = rl("train", str(path), f"run_dir={tmp_path / 'again'}", "trainer.max_steps=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stable(metrics(tmp_path / "again")) == stable(metrics(run_dir))  # seeded per (prompt, episode, turn)
