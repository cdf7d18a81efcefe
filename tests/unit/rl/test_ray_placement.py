"""GPU-aware Ray placement on a real local Ray cluster that declares 4 logical GPUs (no GPU needed): each actor is
granted the devices its `cluster.resources` say, learner ranks share one PACK placement group, rollout workers a
SPREAD one; a CPU-only job asks for no GPUs; a request the cluster can never meet is a UserError."""

from __future__ import annotations

import pytest

from rl.config import load_job
from rl.errors import UserError

pytestmark = pytest.mark.ray

GPU_JOB = ("cluster={name: ray, learners: 2, rollout_workers: 2, "
           "resources: {learner: {gpus: 1}, rollout: {gpus: 1}}}")


@pytest.fixture(scope="module")
def ray():
    # at setup, not collection: the skip is then seen as a ray-marked test's, which fails under CI
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _probes(ray, cfg):
    """The hosts of place_ray, placed by the same code, with nothing built in them (a learner rank is built
    later by `build`; a rollout host builds what its factory gives: here a bare object)."""
    from rl.loop.cluster import LearnerHost, RolloutHost
    from rl.loop.ray_placement import reserve_learners, reserve_rollout

    learners, rollout = reserve_learners(ray, cfg), reserve_rollout(ray, cfg)
    ranks = [ray.remote(LearnerHost).options(**learners.options(r)).remote(1) for r in range(cfg.learners)]
    workers = [ray.remote(RolloutHost).options(**rollout.options(i)).remote(object, 1)
               for i in range(cfg.rollout_workers)]
    return learners, rollout, ranks, workers


def _release(ray, actors, *gangs):
    for actor in actors:
        ray.kill(actor)
    for gang in gangs:
        gang.remove()


def test_each_actor_gets_the_gpus_its_resources_say_learners_packed_in_one_group(ray):
    cfg = load_job("tiny", [GPU_JOB]).cluster
    learners, rollout, ranks, workers = _probes(ray, cfg)
    try:
        seen = ray.get([a.placement.remote() for a in ranks + workers], timeout=120)
        gpus = [tuple(p["gpu_ids"]) for p in seen]
        assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == 4, seen  # one each, disjoint
        assert [p["cuda_visible_devices"] for p in seen] == [",".join(str(i) for i in g) for g in gpus]
        groups = [p["placement_group"] for p in seen]
        assert groups[0] is not None and groups[0] == groups[1] == learners.pg.id.hex()  # one group, both ranks
        assert groups[2] == groups[3] == rollout.pg.id.hex() != groups[0]
        table = ray.util.placement_group_table(learners.pg)
        assert table["strategy"] == "PACK" and list(table["bundles"].values()) == [{"GPU": 1.0}] * 2
        assert ray.util.placement_group_table(rollout.pg)["strategy"] == "SPREAD"
    finally:
        _release(ray, ranks + workers, learners, rollout)


def test_a_restarted_rollout_worker_keeps_its_gpu(ray):
    from rl.loop.cluster import RayWorkers, RolloutHost
    from rl.loop.ray_placement import reserve_rollout

    cfg = load_job("tiny", [GPU_JOB]).cluster
    rollout = reserve_rollout(ray, cfg)
    host = ray.remote(RolloutHost)
    workers = RayWorkers(ray, lambda i: host.options(**rollout.options(i)).remote(object, 1), 2, 120)
    try:
        before = ray.get(workers.actors[0].placement.remote(), timeout=120)
        workers._restart(0)
        after = ray.get(workers.actors[0].placement.remote(), timeout=120)
        assert after["pid"] != before["pid"] and after["gpu_ids"] == before["gpu_ids"] and len(after["gpu_ids"]) == 1
    finally:
        workers.close()
        rollout.remove()


def test_a_cpu_only_job_asks_for_no_gpus_and_makes_no_empty_placement_group(ray):
    cfg = load_job("tiny", ["cluster={name: ray, learners: 2, rollout_workers: 1}"]).cluster
    groups_before = len(ray.util.placement_group_table())
    learners, rollout, ranks, workers = _probes(ray, cfg)
    try:
        assert learners.pg is None and rollout.pg is None  # all-zero bundles: Ray would reject them
        assert len(ray.util.placement_group_table()) == groups_before
        seen = ray.get([a.placement.remote() for a in ranks + workers], timeout=120)
        assert [p["gpu_ids"] for p in seen] == [[], [], []], seen
        assert ray.available_resources().get("GPU") == 4  # nothing was granted a GPU
    finally:
        _release(ray, ranks + workers, learners, rollout)


@pytest.mark.parametrize(("resources", "match"), [
    ("learners: 3, resources: {learner: {gpus: 2}}", r"3 learner ranks x 2 GPU.*has 4 GPU.*cluster\.learners"),
    ("rollout_workers: 2, resources: {learner: {gpus: 2}, rollout: {gpus: 2}}", r"6 GPU.*has 4 GPU"),
    ("resources: {rollout: {gpus: 5}}", r"one rollout worker asks for 5 GPU.*largest node has 4"),
    ("resources: {learner: {cpus: 3}}", r"CPU.*has 2 CPU"),
])
def test_a_request_the_cluster_can_never_meet_is_a_user_error_at_once(ray, resources, match):
    from rl.loop.ray_placement import check_fits

    cfg = load_job("tiny", [f"cluster={{name: ray, {resources}}}"]).cluster
    with pytest.raises(UserError, match=match):
        check_fits(ray, cfg)
    assert len(ray.util.placement_group_table()) == 0 or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
