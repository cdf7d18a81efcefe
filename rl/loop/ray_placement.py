"""Where `cluster: ray` puts its actors: `cluster.resources` turned into Ray placement groups and actor options.

Learner ranks: one placement group, strategy PACK (Ray packs the bundles onto as few nodes as possible, so ranks
share a node, and NVLink, where they fit), one bundle per rank. Rollout workers: one placement group, strategy
SPREAD (Ray places the bundles on distinct nodes as evenly as it can), one bundle per worker. A placement group
rather than the per-actor `scheduling_strategy="SPREAD"` because a group reserves the resources: a rollout worker
restarted after a crash goes back into its own bundle, so its GPU cannot have been taken meanwhile, and a request
the cluster cannot meet shows up at once (`pg.wait`) instead of as an actor pending forever. Ray rejects bundles
whose resources are all zero, so a CPU-only job with the default all-zero resources makes no group: its actors
ask for nothing and are scheduled by Ray's default strategy (learners) or SPREAD (rollout workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from rl.errors import UserError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from rl.config.base import Resources
    from rl.config.job import RayCluster

FIX = ("Lower cluster.learners, cluster.rollout_workers or cluster.resources.{learner,rollout}.{gpus,cpus}, or give "
       "the cluster more (a local one: cluster.num_gpus / cluster.num_cpus; a started one: `ray start --num-gpus N "
       "--num-cpus N` on each node).")


def bundle(res: Resources) -> dict[str, float]:
    """One actor's Ray bundle; no zero entries (an all-zero bundle is empty, which Ray rejects)."""
    return {key: amount for key, amount in (("CPU", res.cpus), ("GPU", res.gpus)) if amount > 0}


@dataclass
class Gang:
    """N actors of one kind: actor i goes into bundle i of `pg`, or (no resources asked) anywhere by `fallback`."""

    res: Resources
    pg: PlacementGroup | None
    fallback: str
    ray: ModuleType

    def options(self, index: int) -> dict[str, object]:
        """`ray.remote(cls).options(**gang.options(i))` for actor i (the same i again when it is restarted)."""
        if self.pg is None:
            strategy: object = self.fallback
        else:
            strategy = self.ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=index)
        return {"num_cpus": self.res.cpus, "num_gpus": self.res.gpus, "scheduling_strategy": strategy}

    def remove(self) -> None:
        if self.pg is not None:
            self.ray.util.remove_placement_group(self.pg)
            self.pg = None


def reserve_learners(ray: ModuleType, cfg: RayCluster) -> Gang:
    """The learner ranks' group: PACK, one bundle of `resources.learner` per rank."""
    return _reserve(ray, "learner ranks", cfg.resources.learner, cfg.learners, "PACK", "DEFAULT", cfg.call_timeout_s)


def reserve_rollout(ray: ModuleType, cfg: RayCluster) -> Gang:
    """The rollout workers' group: SPREAD, one bundle of `resources.rollout` per worker."""
    return _reserve(ray, "rollout workers", cfg.resources.rollout, cfg.rollout_workers, "SPREAD", "SPREAD",
                    cfg.call_timeout_s)


def _reserve(ray: ModuleType, what: str, res: Resources, count: int, strategy: str, fallback: str,
             timeout_s: float) -> Gang:
    wanted = bundle(res)
    if not wanted:
        return Gang(res, None, fallback, ray)
    pg = ray.util.placement_group([wanted] * count, strategy=strategy)
    if not pg.wait(timeout_seconds=timeout_s):  # the cluster could meet it in principle, but not now
        ray.util.remove_placement_group(pg)
        raise UserError(f"Ray could not reserve {count} {what} x {wanted} within {timeout_s:.0f}s "
                        f"(cluster.call_timeout_s): other jobs hold the resources, or no node has room. "
                        f"Free some (`ray status` shows what is used), or ask for less. {FIX}")
    return Gang(res, pg, fallback, ray)


def check_fits(ray: ModuleType, cfg: RayCluster) -> None:
    """Raise a UserError if the cluster can never hold what the job asks for (in all, or one actor on any one
    node), before waiting on a placement group that would never be ready."""
    totals = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    actors = (("learner rank", cfg.learners, cfg.resources.learner),
              ("rollout worker", cfg.rollout_workers, cfg.resources.rollout))
    for key, name in (("GPU", "gpus"), ("CPU", "cpus")):
        asked = [(what, count, float(getattr(res, name))) for what, count, res in actors]
        largest = max((float(node.get(key, 0.0)) for node in nodes), default=0.0)
        for what, _, each in asked:
            if each > largest:
                raise UserError(f"one {what} asks for {each:g} {key} (cluster.resources), but the Ray cluster's "
                                f"largest node has {largest:g} {key}: one actor cannot span nodes. {FIX}")
        need, have = sum(count * each for _, count, each in asked), float(totals.get(key, 0.0))
        if need > have:
            terms = " + ".join(f"{count} {what}s x {each:g} {key}" for what, count, each in asked if each)
            raise UserError(f"cluster.resources asks for {terms} = {need:g} {key} in all, but the Ray cluster has "
                            f"{have:g} {key}. {FIX}")
