"""Cluster keys of issue 22: learner ranks, what they rule out, and joining a torchrun/srun launch."""

from __future__ import annotations

import pytest

from rl.config import load_job
from rl.errors import UserError
from rl.loop import distributed


def test_learners_default_to_one_and_a_sharded_learner_never_samples_itself() -> None:
    assert load_job("tiny").cluster.learners == 1
    assert load_job("tiny").sampler_is_learner
    assert not load_job("tiny", ["cluster.learners=2"]).sampler_is_learner  # sharded weights: the engine has a copy


def test_a_frozen_reference_with_sharded_full_fine_tuning_is_refused_with_the_fix() -> None:
    with pytest.raises(UserError, match=r"kl\.coef=0, or cluster\.learners=1"):
        load_job("tiny", ["cluster.learners=2", "algorithm.kl.coef=0.1"])
    load_job("tiny", ["cluster.learners=2", "algorithm.kl.coef=0.1", "adapter.name=lora"])  # adapter off = reference


def test_a_torchrun_launch_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launched() is None
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(UserError, match="export MASTER_ADDR"):  # srun sets no rendezvous address
        distributed.launched()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    launch = distributed.launched()
    assert launch is not None
    assert (launch.rank, launch.world_size, launch.address, launch.port) == (1, 2, "node0", 29500)
    with pytest.raises(UserError, match=r"cluster\.learners=2"):
        distributed.check_launch(load_job("tiny"), launch)
    distributed.check_launch(load_job("tiny", ["cluster.learners=2"]), launch)
