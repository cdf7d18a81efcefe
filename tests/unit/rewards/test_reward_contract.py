"""The reward contract: return types, batched/async functions, loading by path, weights and on_error."""

import logging
import math
import textwrap

import pytest
import torch

from rewards import RewardError, RewardOutput, batched_reward, normalise
from rewards.calling import call_reward
from rewards.scoring import build_scorer
from rl.config.rewards import RewardConfig, ShapingConfig
from rl.errors import UserError

USER_REWARDS = '''
from rewards import RewardOutput

def brevity(prompt, completion, answer=None):
    words = len(completion.split())
    return RewardOutput(total=1.0 - words / 10, components={"words": words})

def as_mapping(prompt, completion, **fields):
    return {"total": 0.5, "components": {"has_answer": float("answer" in fields)}}

def not_applicable(prompt, completion, **fields):
    return None if completion == "skip" else 2.0
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_normalise_accepts_every_contract_form_and_rejects_the_rest():
    assert normalise(0.5) == (0.5, {})
    assert normalise(True) == (1.0, {})
    assert normalise(None) == (None, {})
    assert normalise(RewardOutput(1, {"a": 2})) == (1.0, {"a": 2.0})
    assert normalise({"total": 3, "components": {"b": 1}}) == (3.0, {"b": 1.0})
    for bad in ("1.0", [1.0], math.nan, math.inf, {"total": 1, "components": {"x": math.nan}}, {"score": 1}):
        with pytest.raises(RewardError):
            normalise(bad)


def test_call_reward_plain_batched_and_async_functions():
    def plain(prompt, completion, answer):  # no **fields: extra columns must not be passed
        return float(completion == answer)

    @batched_reward
    def batched(prompts, completions, answer, **fields):
        return [float(c == a) for c, a in zip(completions, answer)]

    async def judged(prompt, completion, **fields):
        return len(completion)

    fields = [{"answer": "1", "other": 0}, {"answer": "2", "other": 0}]
    for fn in (plain, batched):
        assert call_reward(fn, ["p", "p"], ["1", "3"], fields, {}) == [("ok", (1.0, {})), ("ok", (0.0, {}))]
    assert call_reward(judged, ["p", "p"], ["ab", "abc"], fields, {}) == [("ok", (2.0, {})), ("ok", (3.0, {}))]


def test_one_failing_sample_does_not_hide_the_others():
    def picky(prompt, completion, **fields):
        return 1 / int(completion)

    out = call_reward(picky, ["p", "p"], ["0", "2"], [{}, {}], {})
    assert out[0][0] == "error" and "ZeroDivisionError" in out[0][1] and out[1] == ("ok", (0.5, {}))


def test_user_file_reward_loaded_by_path_gives_weighted_total_and_components(user_file, make_batch):
    cfgs = [RewardConfig(import_path=f"{user_file}:brevity", weight=2.0),
            RewardConfig(import_path=f"{user_file}:as_mapping", isolate=False),
            RewardConfig(import_path=f"{user_file}:not_applicable")]
    batch = make_batch(["one two", "skip"], meta=[{"answer": "1"}, {"answer": "2"}])
    with build_scorer(cfgs, ShapingConfig()) as scorer:
        result = scorer.score(batch)
    assert torch.allclose(result.components["brevity"], torch.tensor([0.8, 0.9]))
    assert result.components["brevity/words"].tolist() == [2.0, 1.0]
    assert result.components["as_mapping/has_answer"].tolist() == [1.0, 1.0]
    assert result.components["not_applicable"][0] == 2.0 and math.isnan(result.components["not_applicable"][1])
    # None contributes 0 to the total: 2*0.8 + 0.5 + 2 and 2*0.9 + 0.5 + 0
    assert torch.allclose(result.total, torch.tensor([4.1, 2.3]))
    assert result.errors == {"brevity": 0, "as_mapping": 0, "not_applicable": 0} and bool(result.keep.all())


def test_bad_reward_paths_and_names_are_user_errors(tmp_path, user_file):
    with pytest.raises(UserError, match="defines no 'missing'"):
        build_scorer([RewardConfig(import_path=f"{user_file}:missing")], ShapingConfig())
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(UserError, match="failed to import"):
        build_scorer([RewardConfig(import_path=f"{broken}:f")], ShapingConfig())
    with pytest.raises(ValueError, match="unknown reward 'math_answr'"):
        RewardConfig(name="math_answr")


def _flaky(prompt, completion, **fields):
    if completion == "bad":
        raise RuntimeError("boom")
    return 1.0


def test_on_error_zero_drop_group_and_fail(monkeypatch, make_batch, caplog):
    from rewards import scoring

    monkeypatch.setattr(scoring, "load_function", lambda name, path: _flaky)
    batch = make_batch(["ok", "bad", "bad", "ok"], groups=[0, 0, 1, 1])
    cfg = RewardConfig(import_path="anything:flaky", isolate=False)
    with caplog.at_level(logging.WARNING), build_scorer([cfg], ShapingConfig()) as scorer:
        result = scorer.score(batch)
    assert result.total.tolist() == [1.0, 0.0, 0.0, 1.0] and result.errors == {"flaky": 2}
    assert bool(result.keep.all())
    assert sum("boom" in r.getMessage() for r in caplog.records) == 1  # logged once per cause

    with build_scorer([cfg.model_copy(update={"on_error": "drop_group"})], ShapingConfig()) as scorer:
        assert scorer.score(batch).keep.tolist() == [False, False, False, False]
    with build_scorer([cfg.model_copy(update={"on_error": "drop_group"})], ShapingConfig()) as scorer:
        assert scorer.score(make_batch(["ok", "ok", "bad", "ok"], groups=[0, 0, 1, 1])).keep.tolist() == \
            [True, True, False, False]
    with (build_scorer([cfg.model_copy(update={"on_error": "fail"})], ShapingConfig()) as scorer,
          pytest.raises(UserError, match="reward 'flaky' failed: RuntimeError: boom")):
        scorer.score(batch)


def test_builtin_reward_kwargs_reach_the_function(make_batch):
    cfg = RewardConfig(name="length_penalty", kwargs={"max_chars": 2})
    with build_scorer([cfg], ShapingConfig()) as scorer:
        assert scorer.score(make_batch(["ab", "abc", "abcdef"])).total.tolist() == [0.0, -0.5, -1.0]


def test_user_file_outside_the_package_runs_in_a_worker(tmp_path, make_batch):
    path = tmp_path / "elsewhere" / "score.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent('''
        import os
        def where(prompt, completion, **fields):
            return {"total": 1.0, "components": {"pid": os.getpid()}}
    '''))
    import os

    with build_scorer([RewardConfig(import_path=f"{path}:where")], ShapingConfig()) as scorer:
        result = scorer.score(make_batch(["x"]))
    assert result.total.tolist() == [1.0] and result.components["where/pid"].item() != os.getpid()


ALL_FORMS = '''
from rewards import RewardOutput, batched_reward

def brevity(prompt, completion, answer=None, **fields):
    return RewardOutput(total=1.0 - len(completion) / 10, components={"chars": float(len(completion))})

def as_mapping(prompt, completion, **fields):
    return {"total": 0.5, "components": {"half": 0.5}}

def only_some(prompt, completion, answer=None, **fields):
    return None if answer == "skip" else 1.0

@batched_reward
def batched(prompts, completions, answer, **fields):
    return [float(a == c) for a, c in zip(answer, completions)]

async def asynchronous(prompt, completion, **fields):
    return 2.0
'''


def test_every_return_form_isolated_or_not(tmp_path, make_batch):
    path = tmp_path / "forms.py"
    path.write_text(ALL_FORMS)
    cfgs = [RewardConfig(import_path=f"{path}:{fn}", weight=2.0 if fn == "as_mapping" else 1.0)
            for fn in ("brevity", "as_mapping", "only_some", "batched")]
    cfgs.append(RewardConfig(import_path=f"{path}:asynchronous", isolate=False))
    with build_scorer(cfgs, ShapingConfig()) as scorer:
        result = scorer.score(make_batch(["4", "12345"], meta=[{"answer": "4"}, {"answer": "skip"}], groups=[0, 0]))
    assert result.components["brevity"].tolist() == pytest.approx([0.9, 0.5])
    assert result.components["brevity/chars"].tolist() == [1.0, 5.0]
    assert result.components["as_mapping/half"].tolist() == [0.5, 0.5]
    assert result.components["only_some"][0] == 1.0 and math.isnan(result.components["only_some"][1])
    assert result.components["batched"].tolist() == [1.0, 0.0]
    assert result.components["asynchronous"].tolist() == [2.0, 2.0]
    assert result.total.tolist() == pytest.approx([0.9 + 1.0 + 1.0 + 1.0 + 2.0, 0.5 + 1.0 + 0.0 + 0.0 + 2.0])
