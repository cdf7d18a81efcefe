"""N learner ranks as Ray actors, end to end with the real learner (tiny job): each rank and rollout worker gets
the logical GPU its resources say, the ranks share one placement group, and a killed rank ends the next call with
a clear, resumable error within the timeout (never a hang), leaving no learner actor behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rl.config import load_job
from rl.errors import UserError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TIMEOUT_S = 60.0
JOB = [
    "trainer.device=cpu",
    "cluster={name: ray, learners: 2, rollout_workers: 2, num_cpus: 2, num_gpus: 4, "
    f"call_timeout_s: {TIMEOUT_S}, collective_timeout_s: 20, "
    "resources: {learner: {gpus: 1}, rollout: {gpus: 1}}}",
]


@pytest.fixture
def ray():
    ray = pytest.importorskip("ray")  # at setup: a skip is then this ray-marked test's (a failure under CI)
    yield ray
    ray.shutdown()


def test_learner_ranks_are_placed_on_their_gpus_and_a_killed_rank_ends_the_call_cleanly(ray, tiny_model_dir):
    from rl.loop.runtime import build_placement

    placement = build_placement(load_job("tiny", JOB), tiny_model_dir)  # place_ray starts the 4-GPU cluster
    try:
        ranks, workers = placement.learner.actors, placement.rollout.workers.actors
        seen = ray.get([a.placement.remote() for a in ranks + workers], timeout=TIMEOUT_S)
        gpus = [tuple(p["gpu_ids"]) for p in seen]
        assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == 4, seen
        assert seen[0]["placement_group"] is not None and seen[0]["placement_group"] == seen[1]["placement_group"]
        assert placement.learner.weights("full").tensors  # both ranks answer; rank 0's result comes back

        os.kill(seen[1]["pid"], signal.SIGKILL)  # learner rank 1 dies
        start = time.monotonic()
        with pytest.raises(UserError, match=r"learner rank 1 .*rl train --resume RUN_DIR"):
            placement.learner.weights("full")
        assert time.monotonic() - start < TIMEOUT_S
        with pytest.raises(ray.exceptions.RayActorError):  # rank 0 was killed too: nothing is left hanging
            ray.get(ranks[0].placement.remote(), timeout=TIMEOUT_S)
    finally:
        placement.close()


class _AllReduceLearner:
    """A learner whose every `weights()` is a collective across the ranks, as the sharded learner's calls are."""

    def weights(self, mode):
        import torch
        import torch.distributed as dist

        total = torch.ones(1)
        dist.all_reduce(total)
        return float(total)


class _NoWorker:
    def close(self):
        pass


def test_a_rank_killed_while_the_others_wait_in_a_collective_ends_the_call_before_its_timeout(ray, tmp_path):
    """Rank 0 sits in an all-reduce its dead peer never joins (until collective_timeout_s); the call ends at once
    with the dead rank named, and rank 0 is killed rather than left waiting."""
    import sys

    from ray import cloudpickle

    from rl.loop.cluster import place_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    collective_s = 45
    job = load_job("tiny", ["trainer.device=cpu", f"run_dir={tmp_path}",
                            f"cluster={{name: ray, learners: 2, num_cpus: 2, call_timeout_s: {TIMEOUT_S}, "
                            f"collective_timeout_s: {collective_s}}}"])
    placement = place_ray(job, _AllReduceLearner, lambda learner: _NoWorker())
    try:
        ranks = placement.learner.actors
        assert placement.learner.weights("full") == 2.0  # a real 2-rank group: the all-reduce sums both
        ray.kill(ranks[1])
        start = time.monotonic()
        with pytest.raises(UserError, match=r"learner rank 1 \(of 2\) died during weights\(\).*--resume"):
            placement.learner.weights("full")
        assert time.monotonic() - start < collective_s / 3
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(ranks[0].placement.remote(), timeout=TIMEOUT_S)
    finally:
        placement.close()
