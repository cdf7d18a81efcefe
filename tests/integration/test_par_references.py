"""PAR with references from the reference policy (`shaping.par_references: policy`): generated once per training
prompt by the initial weights, scored by the job's own reward total, cached in RUN_DIR/par/, reused after a
resume, refreshed on schedule, and refused when the reward total they were scored by is not the job's."""

from __future__ import annotations

import json

import pytest
from helpers import metrics

import rl.loop.par_references as par_refs
from rl.config import load_job
from rl.errors import UserError
from rl.loop.driver import resume_job, train_job

TRAIN_PROMPTS = 6
BASE = ["env.train_size=6", "shaping.par=true", "shaping.par_samples=3", "trainer.save_every_steps=2",
        "rollout.max_new_tokens=6"]


@pytest.fixture
def generations(monkeypatch):
    """Counts the real generation passes (the function runs unchanged)."""
    calls: list[int] = []
    real = par_refs.generate

    def counted(parts, prompts, step):
        calls.append(len(prompts))
        return real(parts, prompts, step)

    monkeypatch.setattr(par_refs, "generate", counted)
    return calls


def test_references_are_generated_once_per_prompt_scored_by_the_job_and_reused_after_resume(tmp_path, generations):
    run = tmp_path / "run"
    assert train_job(load_job("tiny", [*BASE, f"run_dir={run}", "trainer.max_steps=2"])) == 0
    assert generations == [TRAIN_PROMPTS]
    ref_file = run / "par" / "references_step0.json"
    saved = json.loads(ref_file.read_text())
    assert saved["rewards"] == [["math_answer", 1.0], ["digit_fraction", 0.5]]
    refs = saved["references"]
    assert len(refs) == TRAIN_PROMPTS and all(len(r["rewards"]) == len(r["texts"]) == 3 for r in refs.values())
    # The references' rewards are the job's own weighted total of their texts.
    from rewards.builtin import digit_fraction, math_answer

    job = load_job("tiny", [*BASE, f"run_dir={run}"])
    env_prompts = {p.prompt_id: p for p in _train_prompts(job)}
    for pid, r in refs.items():
        meta = dict(env_prompts[pid].meta)
        expected = [float(math_answer(env_prompts[pid].text, t, **meta) or 0.0)
                    + 0.5 * float(digit_fraction(env_prompts[pid].text, t, **meta) or 0.0) for t in r["texts"]]
        assert r["rewards"] == pytest.approx(expected)
    before = ref_file.stat().st_mtime_ns
    assert resume_job(str(run), ["trainer.max_steps=4"]) == 0
    assert generations == [TRAIN_PROMPTS], "a resume generates nothing: it reuses the initial policy's references"
    assert ref_file.stat().st_mtime_ns == before and sorted(p.name for p in (run / "par").iterdir()) == [ref_file.name]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert all(0.0 < r["reward/mean"] < 1.0 for r in metrics(run))  # PAR's sigmoid: strictly inside (0, 1)


def _train_prompts(job):
    from rl.loop.runtime import build_env
    from rl.models import load_tokenizer, resolve_model

    return build_env(job, load_tokenizer(resolve_model(job.model.path))).train_prompts()


def test_references_refresh_on_schedule_and_a_changed_reward_total_is_refused(tmp_path, generations):
    run = tmp_path / "run"
    job = load_job("tiny", [*BASE, f"run_dir={run}", "trainer.max_steps=4", "shaping.par_refresh_steps=2"])
    assert train_job(job) == 0
    assert sorted(p.name for p in (run / "par").iterdir()) == ["references_step0.json", "references_step2.json"]
    assert generations == [TRAIN_PROMPTS, TRAIN_PROMPTS]
    with pytest.raises(UserError, match="PAR would compare different quantities"):
        resume_job(str(run), ["trainer.max_steps=5", "rewards=[{name: math_answer}]"])
