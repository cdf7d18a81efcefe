"""Paper defaults of the GRPO family resolved at validation: aggregation from the loss/advantage, the Dr.GRPO
constant from rollout.max_new_tokens, and `correction.level: auto` from where the sampler's weights live."""

import pytest
import yaml

from rl.config import dump_job, load_job, validate_job
from rl.errors import UserError


def job(algorithm: dict, **sections) -> dict:
    return {"algorithm": algorithm, "rollout": {"max_new_tokens": 24}, **sections}


@pytest.mark.parametrize("loss, advantage, expected", [
    ("ppo_clip", "grpo", "token_mean"),
    ("gspo", "grpo", "seq_mean_token_mean"),
    ("gspo_token", "grpo", "seq_mean_token_mean"),
    ("ppo_clip", "dr_grpo", "constant"),
    ("reinforce", "dr_grpo", "constant"),
    ("gspo", "dr_grpo", "seq_mean_token_mean"),  # the loss decides: GSPO's objective is a mean over sequences
    ("rapid", "dr_grpo", "token_mean"),  # rapid does not use algorithm.advantage
])
def test_aggregation_follows_the_loss_and_advantage_when_not_set(loss, advantage, expected):
    algo = validate_job(job({"loss": {"name": loss}, "advantage": {"name": advantage}}), "job").algorithm
    assert algo.aggregation.name == expected
    if expected == "constant":  # Dr.GRPO's C: the generation budget, written out
        assert algo.aggregation.max_length == 24


@pytest.mark.parametrize("algorithm", [
    {"loss": {"name": "gspo"}, "aggregation": {"name": "token_mean"}},
    {"loss": {"name": "gspo_token"}, "aggregation": {"name": "seq_mean_token_sum"}},
    {"advantage": {"name": "dr_grpo"}, "aggregation": {"name": "token_mean"}},
    {"loss": {"name": "gspo"}, "advantage": {"name": "dr_grpo"}, "aggregation": {"name": "constant"}},
])
def test_an_explicit_non_paper_aggregation_is_an_error_naming_the_key(algorithm):
    with pytest.raises(UserError) as err:
        validate_job(job(algorithm), "job.yaml")
    message = str(err.value)
    assert "\n  algorithm.aggregation: '" in message and "allow_nonstandard_aggregation: true" in message
    assert "Traceback" not in message


def test_the_opt_in_keeps_a_non_paper_aggregation():
    algo = validate_job(job({"loss": {"name": "gspo"}, "aggregation": {"name": "token_mean"},
                             "allow_nonstandard_aggregation": True}), "job").algorithm
    assert algo.aggregation.name == "token_mean" and algo.allow_nonstandard_aggregation
    matching = validate_job(job({"loss": {"name": "gspo"}, "aggregation": {"name": "seq_mean_token_mean"}}), "job")
    assert matching.algorithm.aggregation.name == "seq_mean_token_mean"  # the paper's pair needs no opt-in


def test_explicit_dr_grpo_constant_is_kept():
    algo = validate_job(job({"advantage": {"name": "dr_grpo"}, "aggregation": {"name": "constant", "max_length": 7}}),
                        "job").algorithm
    assert algo.aggregation.max_length == 7


def test_resolved_values_are_written_to_config_yaml_and_reload_unchanged(tmp_path):
    resolved = validate_job(job({"loss": {"name": "gspo"}}, trainer={"mode": "async"}), "job")
    dr = validate_job(job({"advantage": {"name": "dr_grpo"}}), "job")
    for i, j in enumerate((resolved, dr)):
        path = tmp_path / f"config{i}.yaml"
        dump_job(j, path)
        assert load_job(str(path)) == j  # a resumed run validates to the same job
    written = yaml.safe_load((tmp_path / "config0.yaml").read_text())["algorithm"]
    assert written["aggregation"] == {"name": "seq_mean_token_mean"}
    assert written["correction"]["level"] == "token"
    assert yaml.safe_load((tmp_path / "config1.yaml").read_text())["algorithm"]["aggregation"] == {
        "name": "constant", "max_length": 24}


@pytest.mark.parametrize("sections, expected", [
    ({}, "none"),  # local, hf, sync: the engine samples with the learner's own model
    ({"trainer": {"mode": "async"}}, "token"),  # the sampler is a copy one version behind
    ({"rollout": {"backend": "vllm"}}, "token"),  # other kernels
    ({"cluster": {"name": "ray"}}, "token"),  # workers hold synced copies
])
def test_auto_correction_is_token_whenever_the_sampler_can_differ_from_the_learner(sections, expected):
    algo = validate_job({"algorithm": {}, **sections}, "job").algorithm
    assert algo.correction.level == expected
    explicit = validate_job({"algorithm": {"correction": {"level": "sequence"}}, **sections}, "job")
    assert explicit.algorithm.correction.level == "sequence"


def test_builtin_jobs_resolve_auto_correction():
    assert load_job("tiny").algorithm.correction.level == "none"
    assert load_job("tiny", ["trainer.mode=async"]).algorithm.correction.level == "token"
    assert load_job("grpo_ma", ["rollout.backend=vllm"]).algorithm.correction.level == "token"


def test_rapid_with_sampler_logprobs_is_corrected_once():
    """RAPID's sequence weight pi / pi_sampler is already the whole sampler correction: `auto` adds none, and an
    explicit token/sequence TIS weight on top (applied twice) is refused."""
    rapid = {"name": "rapid", "behaviour_logprobs": "sampler"}
    algo = validate_job({"algorithm": {"loss": rapid}, "rollout": {"backend": "vllm"}}, "job").algorithm
    assert algo.correction.level == "none"
    learner = validate_job({"algorithm": {"loss": {"name": "rapid"}}, "rollout": {"backend": "vllm"}}, "job")
    assert learner.algorithm.correction.level == "token"  # pi_b recomputed by the learner: TIS corrects the sampler
    for level in ("token", "sequence"):
        with pytest.raises(UserError, match=r"algorithm\.correction: level '(token|sequence)'.*twice"):
            validate_job({"algorithm": {"loss": rapid, "correction": {"level": level}}}, "job")


def test_grpo_ma_still_checks_its_own_aggregation():
    with pytest.raises(UserError, match="seq_mean_token_sum"):
        load_job("grpo_ma", ["algorithm.aggregation.name=token_mean"])
    assert load_job("grpo_ma").algorithm.aggregation.name == "seq_mean_token_sum"


# ----- `custom` loss and advantage: user code by import_path, loaded and checked at validation -------------
USER_CODE = '''
import torch

def my_loss(logp, old_logp, adv, mask, cfg):
    return -adv * logp * cfg.kwargs.get("scale", 1.0), {}

def my_advantage(rewards, group_ids, cfg):
    return rewards - rewards.mean()

def two_arguments(logp, adv):
    return -adv * logp, {}
'''


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "user_objectives.py"
    path.write_text(USER_CODE)
    return path


def test_a_custom_loss_and_advantage_load_from_a_file(user_file):
    algo = validate_job(job({"loss": {"name": "custom", "import_path": f"{user_file}:my_loss", "kwargs": {"scale": 2}},
                             "advantage": {"name": "custom", "import_path": f"{user_file}:my_advantage"}},
                            rollout={"backend": "vllm"}), "job").algorithm
    assert algo.loss.name == "custom" and algo.loss.kwargs == {"scale": 2}
    assert algo.advantage.name == "custom" and algo.advantage.import_path.endswith(":my_advantage")
    assert algo.aggregation.name == "token_mean"  # no paper prescribes one for user code
    assert algo.correction.level == "token"  # vLLM samples: the mismatch is corrected as for a built-in loss
    from rl.registries import ADVANTAGES, LOSSES

    assert LOSSES.entry_for(algo.loss).fn.__name__ == "my_loss"
    assert ADVANTAGES.entry_for(algo.advantage).__name__ == "my_advantage"


@pytest.mark.parametrize("import_path, problem", [
    ("no_such_file.py:my_loss", "custom code file not found"),
    ("{file}:not_there", "defines no 'not_there'"),
    ("{file}:two_arguments", "must accept (logp, old_logp, adv, mask, cfg)"),
])
def test_a_bad_custom_loss_is_a_user_error_at_algorithm_loss(user_file, import_path, problem):
    with pytest.raises(UserError) as err:
        load_job("tiny", [f"algorithm.loss={{name: custom, import_path: '{import_path.format(file=user_file)}'}}"])
    message = str(err.value)
    assert "algorithm.loss" in message and problem in message, message
    assert "Traceback" not in message


def test_a_bad_custom_advantage_is_a_user_error_at_algorithm_advantage(user_file):
    with pytest.raises(UserError) as err:
        load_job("tiny", [f"algorithm.advantage={{name: custom, import_path: '{user_file}:my_loss'}}"])
    message = str(err.value)
    assert "algorithm.advantage" in message and "must accept (rewards, group_ids, cfg)" in message, message


def test_the_cli_exits_2_on_a_custom_loss_with_a_wrong_signature(user_file, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"loss": {"name": "custom",
                                                           "import_path": "user_objectives.py:two_arguments"}}}))
    done = subprocess.run([sys.executable, "-m", "rl.cli", "validate", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "algorithm.loss" in done.stderr and "two_arguments" in done.stderr and "Traceback" not in done.stderr


def test_grpo_ma_does_not_take_a_custom_loss(user_file):
    with pytest.raises(UserError, match="grpo_ma needs a per-token loss"):
        validate_job(job({"name": "grpo_ma", "loss": {"name": "custom", "import_path": f"{user_file}:my_loss"}}),
                     "job")


def test_every_loss_section_says_whether_it_corrects_the_sampler_mismatch(user_file):
    import typing

    from rl.config.algorithm import CustomLoss, LossConfig, LossSection, RapidLoss

    variants = typing.get_args(typing.get_args(LossConfig)[0])
    assert CustomLoss in variants and all(issubclass(v, LossSection) for v in variants)
    for v in variants:
        section = v(import_path=f"{user_file}:my_loss") if v is CustomLoss else v()
        assert section.corrects_sampler_mismatch is False, v
    assert RapidLoss(behaviour_logprobs="sampler").corrects_sampler_mismatch is True
