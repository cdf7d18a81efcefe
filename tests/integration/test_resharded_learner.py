"""The real sharded PolicyLearner (FSDP2 over 2 gloo ranks, its root unit, the trainer's AdamW and schedule)
resumes at another number of ranks and continues exactly (issue 22): a checkpoint its 2 ranks wrote with
`save_policy` continues on 1 rank, and one written on 1 rank continues on 2, each making the update that the
uninterrupted run makes (weights within 1e-6 in fp32, loss within 1e-5 relative: the ranks sum in another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rl.config import load_job
from rl.loop import steps
from rl.loop.learner import PolicyLearner
from rl.loop.policy_state import is_sharded
from rl.models import resolve_model
from tests.integration.ranks_testlib import run_ranks
from tests.unit.trainers.trainer_testlib import build_batch

ADAPTERS = {"full": [], "lora": ["adapter.name=lora", "adapter.r=4", "adapter.alpha=8"]}


def _job(kind: str, learners: int):
    # correction pinned: `auto` resolves by whether the sampler is the learner, which 2 ranks never are
    return load_job("tiny", [f"cluster.learners={learners}", "trainer.lr=1e-3", "trainer.warmup_steps=2",
                             "algorithm.correction.level=token", *ADAPTERS[kind]])


def _batch(job, seed: int):
    # 3 groups of 4 (the 2 ranks get 2 and 1 groups), different lengths
    batch = build_batch([3, 5, 4, 2] * 3, [4, 2, 6, 3, 5, 1, 2, 6, 3, 3, 4, 2], group_size=4, vocab=100,
                        rewards=[1, 0, 0.5, 0, 0, 1, 1, 0, 0.2, 0.9, 0.1, 0], seed=seed)
    return steps.advantages(job, batch)[0]


def _save(learner: PolicyLearner, directory: Path, rank: int) -> None:
    """What a checkpoint holds of the learner: every rank's shards, and rank 0's trainer state (`trainer.pt`)."""
    directory.mkdir(parents=True, exist_ok=True)
    trainer_state = learner.save_policy(str(directory))
    if rank == 0:
        torch.save(trainer_state, directory / "trainer.pt")


def _resume(learner: PolicyLearner, directory: Path) -> None:
    learner.load_policy(str(directory), torch.load(directory / "trainer.pt", weights_only=False))


def _state(learner: PolicyLearner, metrics: dict[str, float]) -> dict:
    weights = {k: v.clone() for k, v in learner.weights("full").tensors.items()}  # one rank: views of the policy
    return {"weights": weights, "loss": metrics["loss"],
            "updates": learner.trainer.updates, "lr": learner.trainer.optimizer.param_groups[0]["lr"]}


def _two_ranks(rank: int, kind: str, work: str) -> dict:
    """Rank `rank` of 2: the uninterrupted sharded run (update 1, save, update 2), then a fresh sharded learner
    resumed from the 1-rank checkpoint (update 2). Rank 0's results are whole."""
    work_dir, job, model_dir = Path(work), _job(kind, 2), resolve_model("tiny-llama")
    learner = PolicyLearner(job, model_dir)
    learner.train_step(_batch(job, 1))
    _save(learner, work_dir / "ckpt_2ranks", rank)
    uninterrupted = _state(learner, learner.train_step(_batch(job, 2)))
    resumed = PolicyLearner(job, model_dir)
    _resume(resumed, work_dir / "ckpt_1rank")
    return {"uninterrupted": uninterrupted, "resumed": _state(resumed, resumed.train_step(_batch(job, 2)))}


def _assert_same_run(got: dict, want: dict) -> None:
    assert got["updates"] == want["updates"] and got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
    assert set(got["weights"]) == set(want["weights"])
    diff = max(float((got["weights"][k] - want["weights"][k]).abs().max()) for k in want["weights"])
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_the_sharded_learner_resumes_exactly_at_another_number_of_ranks(kind: str, tmp_path: Path) -> None:
    job, model_dir = _job(kind, 1), resolve_model("tiny-llama")
    one = PolicyLearner(job, model_dir)
    first = _state(one, one.train_step(_batch(job, 1)))
    _save(one, tmp_path / "ckpt_1rank", 0)
    one_uninterrupted = _state(one, one.train_step(_batch(job, 2)))

    two = run_ranks(_two_ranks, 2, tmp_path, kind, str(tmp_path))[0]
    assert is_sharded(tmp_path / "ckpt_2ranks")
    assert len(list((tmp_path / "ckpt_2ranks" / "policy").glob("*.distcp"))) == 2  # each rank wrote its shards

    _assert_same_run(two["resumed"], one_uninterrupted)  # 1 -> 2
    resumed = PolicyLearner(job, model_dir)  # 2 -> 1
    _resume(resumed, tmp_path / "ckpt_2ranks")
    _assert_same_run(_state(resumed, resumed.train_step(_batch(job, 2))), two["uninterrupted"])
    moved = max(float((one_uninterrupted["weights"][k] - first["weights"][k]).abs().max()) for k in first["weights"])
    assert moved > 1e-4, "update 2 barely moved the weights: the comparisons above would prove little"
