"""`rl train-rm`: the Bradley-Terry objective, learning, resume, the export the `reward_model` reward loads, bad input.

Runs are tiny-llama (full fine-tuning, or LoRA), a few steps each on a keyword-separable preference file.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rl.batch import RolloutBatch
from rl.cli import main
from rl.config import load_job, load_rm_job
from rl.errors import UserError
from rl.loop.metrics import read_metrics
from rl.loop.rm_training import resume_rm_job, train_rm_job
from rl.models import load_reward_model, load_tokenizer
from rl.reward_model import encode, rewards, rm_text
from trainers.reward_model.objective import bradley_terry_loss, pairwise_accuracy

KEYWORD = "GOOD"


def write_prefs(path: Path, n: int = 48, seed: int = 0, **renamed: str) -> Path:
    """Pairs whose preferred response starts with KEYWORD; both responses otherwise random letters."""
    rng = random.Random(seed)

    def noise() -> str:
        return "".join(rng.choice("abcdefgh ") for _ in range(12))

    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **renamed}
    rows = [{columns["prompt"]: f"question {i}?", columns["chosen"]: f"{KEYWORD} {noise()}",
             columns["rejected"]: noise()} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_job(tmp_path: Path, data: Path, run: str = "run", **train: object) -> Path:
    job = {"name": "rm_test", "model": {"path": "tiny-llama"},
           "data": {"path": str(data), "test_fraction": 0.25},
           "train": {"lr": 1e-3, "batch_size": 8, "max_steps": 4, "max_length": 64, **train},
           "logging": {"progress": False, "wandb": {"mode": "disabled"}}, "run_dir": str(tmp_path / run)}
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture
def prefs(tmp_path: Path) -> Path:
    return write_prefs(tmp_path / "prefs.jsonl")


# ----- the objective, by hand ---------------------------------------------------------------------
def test_bradley_terry_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    # margins 2, 0, -2: -log sigmoid(m) = log(1 + e^-m) = 0.126928, 0.693147, 2.126928
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.982334, abs=1e-6)


def test_pairwise_accuracy_counts_a_tie_half():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([0.0, 0.0, 3.0, 4.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


# ----- training ----------------------------------------------------------------------------------------
def test_training_learns_a_separable_preference(tmp_path, tiny_model_dir, prefs):
    job = load_rm_job(str(write_job(tmp_path, prefs, max_steps=8, eval_every=2)))
    assert train_rm_job(job) == 0
    run = Path(job.resolved_run_dir)
    evals = [r["eval/accuracy"] for r in read_metrics(run) if "eval/accuracy" in r]
    assert len(evals) == 4 and evals[-1] >= 0.9, evals  # 12 held-out pairs, up from chance
    report = json.loads((run / "eval" / "step_8.json").read_text())
    assert report["accuracy"] == evals[-1] and report["n"] == 12
    assert (run / "export" / "config.json").is_file()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(prefs, run dir) of a 6-step run checkpointed every 2 steps, the reference of the resume tests."""
    root = tmp_path_factory.mktemp("whole")
    data = write_prefs(root / "prefs.jsonl")
    train_rm_job(load_rm_job(str(write_job(root, data, run="whole", max_steps=6, checkpoint_every=2))))
    return data, root / "whole"


def assert_same_run(a: Path, b: Path) -> None:
    """Same final trained tensors (exactly), same per-step losses (each step once), same final held-out metrics."""
    wa, wb = (load_file(str(r / "checkpoints" / "step_6" / "weights.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in mb] == list(range(1, 7)) and [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert (ma[-1]["eval/accuracy"], ma[-1]["eval/loss"]) == (mb[-1]["eval/accuracy"], mb[-1]["eval/loss"])


def test_resume_to_more_steps_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    prefs, whole = uninterrupted
    train_rm_job(load_rm_job(str(write_job(tmp_path, prefs, run="parts", max_steps=2, checkpoint_every=2))))
    assert resume_rm_job(str(tmp_path / "parts"), ["train.max_steps=6"]) == 0
    assert_same_run(whole, tmp_path / "parts")


def test_a_run_stopped_by_a_full_disk_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, small_tmpfs):
    """A real interruption: the run directory's file system fills at the second checkpoint (a tiny-llama
    checkpoint is about 5.3 MB, the tmpfs 8 MiB); the run, moved elsewhere, resumes from step 2."""
    import shutil

    from rl.loop.checkpoint import DiskFullError

    prefs, whole = uninterrupted
    small = small_tmpfs(8 << 20)
    cut = load_rm_job(str(write_job(tmp_path, prefs, run="cut", max_steps=6, checkpoint_every=2)),
                      [f"run_dir={small / 'run'}"])
    with pytest.raises(DiskFullError, match="no space left") as err:
        train_rm_job(cut)
    assert f"`rl train-rm --resume {small / 'run'}` (optionally with train.keep_last=1)" in str(err.value)
    assert [p.name for p in (small / "run" / "checkpoints").iterdir()] == ["step_2"]
    shutil.copytree(small / "run", tmp_path / "moved")
    assert resume_rm_job(str(tmp_path / "moved")) == 0
    assert_same_run(whole, tmp_path / "moved")


def text_batch(completions: list[str], meta: list[dict[str, object]]) -> RolloutBatch:
    """A RolloutBatch whose only interesting parts are the texts and meta (as tests/unit/rewards builds them)."""
    n = len(completions)
    ones = torch.ones(n, 2, dtype=torch.bool)
    return RolloutBatch(
        input_ids=torch.zeros(n, 2, dtype=torch.long), attention_mask=ones,
        loss_mask=ones & torch.tensor([False, True]), sampling_logprobs=torch.zeros(n, 2),
        prompt_lengths=torch.ones(n, dtype=torch.long), group_ids=torch.arange(n), policy_version=0,
        finish_reasons=["stop"] * n, prompt_texts=["p"] * n, completion_texts=list(completions), sample_meta=meta,
    ).validate()


def test_lora_export_scores_like_the_trainer_through_the_reward(tmp_path, tiny_model_dir, prefs):
    from rewards.scoring import build_scorer
    from rl.config.rewards import RewardModelReward, ShapingConfig
    from trainers.reward_model.data import Pair
    from trainers.reward_model.model import build_reward_model, load_trainable_state, pair_scores

    job = load_rm_job(str(write_job(tmp_path, prefs, max_steps=2)), ["adapter={name: lora, r: 4}"])
    train_rm_job(job)
    run = Path(job.resolved_run_dir)
    # the trainer's own model: the LoRA-wrapped classifier (unmerged) with the final checkpoint's weights
    trained, tokenizer = build_reward_model(job, "cpu")
    load_trainable_state(trained, load_file(str(run / "checkpoints" / "step_2" / "weights.safetensors")))
    questions, answers = ["question 1?", "question 7?", "what?"], [f"{KEYWORD} abc", "dd ee", "x"]
    own, _ = pair_scores(trained.eval(), tokenizer, [Pair(q, a, a) for q, a in zip(questions, answers)], 64)
    cfg = RewardModelReward(name="reward_model", path=str(run / "export"), device="cpu", dtype="float32",
                            max_length=64)
    with build_scorer([cfg], ShapingConfig()) as scorer:
        got = scorer.score(text_batch(answers, meta=[{"question": q} for q in questions]), shaped=False)
    assert torch.allclose(got.total, own.detach(), atol=1e-5), (got.total, own)
    # the checkpoint's reward_model/ loads too, and scores the same text the same
    from_ckpt = load_reward_model(str(run / "checkpoints" / "step_2"))
    texts = [rm_text(tokenizer, q, a) for q, a in zip(questions, answers)]
    with torch.no_grad():
        assert torch.allclose(rewards(from_ckpt, encode(tokenizer, texts, 64)), got.total, atol=1e-5)
    assert load_tokenizer(str(run / "export")).chat_template == tokenizer.chat_template


# ----- bad input ------------------------------------------------------------------------------------
def test_missing_chosen_column_names_the_columns_found(tmp_path, tiny_model_dir):
    data = write_prefs(tmp_path / "prefs.jsonl", chosen="preferred")
    job = load_rm_job(str(write_job(tmp_path, data)))
    with pytest.raises(UserError) as err:
        train_rm_job(job)
    message = str(err.value)
    assert str(data) in message and "['chosen']" in message and "preferred" in message
    assert "data.chosen_column" in message


def test_an_empty_preference_file_is_a_user_error(tmp_path):
    empty = tmp_path / "prefs.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="has no rows"):
        train_rm_job(load_rm_job(str(write_job(tmp_path, empty))))


def test_the_cli_exits_2_on_a_bad_key(tmp_path, prefs, capsys):
    assert main(["train-rm", str(write_job(tmp_path, prefs)), "train.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: unknown key; this section accepts: batch_size" in err and " lr, " in err


def test_an_rm_job_is_not_an_rl_job(tmp_path, prefs):
    """The RM loader reports its own keys; an RM job given to `rl train` fails at its RM-only keys."""
    path = write_job(tmp_path, prefs)
    with pytest.raises(UserError, match="data: unknown key"):
        load_job(str(path))
    with pytest.raises(UserError, match="adapter 'rosa' is not available for reward models"):
        load_rm_job(str(path), ["adapter.name=rosa"])


def test_builtin_rm_jobs_are_found_by_name_and_kept_apart_from_rl_jobs(prefs):
    from rl.config import builtin_jobs, builtin_rm_jobs

    assert "smollm2_lora" in builtin_rm_jobs() and "smollm2_lora" not in builtin_jobs()
    job = load_rm_job("smollm2_lora", [f"data.path={prefs}"])
    assert job.adapter is not None and job.adapter.name == "lora" and job.data.path == str(prefs)
    with pytest.raises(UserError, match="neither a YAML file nor a built-in job"):
        load_job("smollm2_lora")
