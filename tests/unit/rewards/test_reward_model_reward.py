"""`name: reward_model`: a reward equals the reward model's own score of the same text (in process and in its
own Ray actor); anything that is not a reward model is refused before a run starts."""

from __future__ import annotations

import os

import pytest
import torch

from rewards.scoring import build_scorer
from rl.config.job import JobConfig
from rl.config.rewards import RewardModelReward, ShapingConfig
from rl.errors import UserError
from rl.models import load_tokenizer, new_reward_model
from rl.reward_model import rm_text

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "What is 12 * 12?"]
ANSWERS = ["The answer is 5.", "Blue, the colour of a clear sky at noon.", "144"]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(0)  # the fresh head is random: a seeded one scores distinct texts distinctly
    out = tmp_path_factory.mktemp("rm")
    model = new_reward_model(tiny_model_dir)
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return str(out)


def own_scores(rm_dir: str, texts: list[str]) -> list[float]:
    """The model's score of each text alone (a batch of one: no padding, no pooling choice involved)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = load_tokenizer(rm_dir)
    with torch.no_grad():
        return [float(model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]) for t in texts]


def score(make_batch, cfg, meta, completions):
    with build_scorer([cfg], ShapingConfig()) as scorer:
        return scorer.score(make_batch(completions, meta=meta))


def test_reward_equals_the_models_own_score_of_the_same_text(rm_dir, make_batch):
    tok = load_tokenizer(rm_dir)
    expected = own_scores(rm_dir, [rm_text(tok, q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    assert len(set(round(e, 4) for e in expected)) == 3, "distinct texts should score distinctly"
    cfg = RewardModelReward(name="reward_model", path=rm_dir, batch_size=2, weight=2.0)  # 2 per pass: padding
    result = score(make_batch, cfg, [{"question": q} for q in QUESTIONS], ANSWERS)
    assert result.components["reward_model"].tolist() == pytest.approx(expected, abs=1e-5)
    assert result.total.tolist() == pytest.approx([2 * e for e in expected], abs=1e-5)
    assert result.errors == {"reward_model": 0}


def test_a_sample_without_a_question_is_that_samples_failure(rm_dir, make_batch):
    cfg = RewardModelReward(name="reward_model", path=rm_dir)
    result = score(make_batch, cfg, [{"question": QUESTIONS[0]}, {}], ANSWERS[:2])
    assert result.errors == {"reward_model": 1}
    assert result.components["reward_model"][1].item() == 0.0 and result.components["reward_model"][0].item() != 0.0


def test_a_causal_lm_is_refused_as_a_reward_model(tiny_model_dir):
    cfg = RewardModelReward(name="reward_model", path=tiny_model_dir)
    with pytest.raises(UserError, match=r"not a reward model.*rl train-rm"):
        build_scorer([cfg], ShapingConfig())


def test_a_missing_directory_is_a_job_error_naming_the_key(tmp_path):
    from rl.config import validate_job

    with pytest.raises(UserError, match=r"rewards\[0\]\.path: reward model directory not found"):
        validate_job({"rewards": [{"name": "reward_model", "path": str(tmp_path / "nope")}]}, "job.yaml")
    job = JobConfig.model_validate({"rewards": [{"name": "math_answer"}, {"name": "reward_model", "path": str(tmp_path),
                                                "alias": "rm"}]})
    assert [r.label for r in job.rewards] == ["math_answer", "rm"]


@pytest.mark.ray
def test_under_ray_the_reward_model_runs_in_its_own_actor_with_its_resources(rm_dir, make_batch):
    ray = pytest.importorskip("ray")  # a skip of this ray-marked test fails CI
    from rl.loop.runtime import build_scorer as job_scorer

    job = JobConfig.model_validate({
        "cluster": {"name": "ray", "num_cpus": 2, "num_gpus": 2},  # logical GPUs: a placement test on CPU
        "rewards": [{"name": "reward_model", "path": rm_dir, "resources": {"gpus": 1}, "device": "cpu"}]})
    tok = load_tokenizer(rm_dir)
    expected = own_scores(rm_dir, [rm_text(tok, q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    try:
        scorer = job_scorer(job)
        try:
            remote = scorer.terms[0].service
            where = remote.placement()
            assert where["pid"] != os.getpid() and len(where["gpu_ids"]) == 1
            result = scorer.score(make_batch(ANSWERS, meta=[{"question": q} for q in QUESTIONS]))
            assert result.components["reward_model"].tolist() == pytest.approx(expected, abs=1e-5)
            ray.kill(remote.actor, no_restart=True)  # a dead actor fails the batch, contained by on_error
            dead = scorer.score(make_batch(ANSWERS, meta=[{"question": q} for q in QUESTIONS]))
            assert dead.errors == {"reward_model": 3} and dead.total.tolist() == [0.0, 0.0, 0.0]
        finally:
            scorer.close()
    finally:
        ray.shutdown()
