"""A reward model in its own Ray actor (`cluster: ray`): its own process and resources (`resources.gpus`), so
a GPU reward model sits on a GPU of its own, apart from the learner's and the rollout workers'.

The actor (processes named `ray::RewardHost`) builds the reward from its factory and config section and scores
whole batches; the driver's proxy is the `BatchReward` the scorer calls. A call that exceeds the reward's
`timeout_s`, or an actor that died, fails that batch (the reward's `on_error` applies to each sample) and is
logged; the actor is restarted by Ray (max_restarts) for the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch

from rl.loop.cluster import ActorPlacement, _init_ray, _placement
from rl.types import BatchReward

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from rl.config.job import RayCluster
    from rl.config.rewards import ServiceRewardConfig

log = logging.getLogger(__name__)


class RewardHost:
    """The actor: one reward, built once."""

    def __init__(self, factory: Callable[..., BatchReward], cfg: ServiceRewardConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        self.reward = factory(cfg)

    def placement(self) -> ActorPlacement:
        return _placement()

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              fields: Sequence[Mapping[str, object]]) -> list[float | Exception]:
        return self.reward(prompts, completions, fields)

    def close(self) -> None:
        self.reward.close()


class RemoteReward:
    """The driver's side: a `BatchReward` whose calls go to the actor, each within the reward's timeout."""

    def __init__(self, cluster: RayCluster, factory: Callable[..., BatchReward], cfg: ServiceRewardConfig) -> None:
        import ray

        _init_ray(ray, cluster)
        self.ray, self.timeout_s = ray, cfg.timeout_s
        res = getattr(cfg, "resources", None)
        gpus, cpus = (res.gpus, res.cpus) if res is not None else (0.0, 0.0)
        # ray types `.remote()` of an actor class as "a handle or the class": it is the handle
        self.actor = cast("ActorHandle", ray.remote(RewardHost).options(
            num_gpus=gpus, num_cpus=cpus, max_restarts=1).remote(factory, cfg, max(1, int(cpus) or 1)))
        # Built before the first batch: a bad model directory fails the run at start, not at step 1.
        ray.get(self.actor.placement.remote(), timeout=cluster.call_timeout_s)

    def placement(self) -> ActorPlacement:
        return self.ray.get(self.actor.placement.remote(), timeout=self.timeout_s)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, object]]) -> list[float | Exception]:
        ref = self.actor.score.remote(list(prompts), list(completions), [dict(f) for f in fields])
        try:
            return self.ray.get(ref, timeout=self.timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            self.ray.cancel(ref, force=True)
            raise TimeoutError(f"the reward model's actor took over timeout_s={self.timeout_s}s") from None

    def close(self) -> None:
        try:
            self.ray.get(self.actor.close.remote(), timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - closing a dead or hung actor: kill it all the same
            log.warning("reward actor did not close cleanly (%s); killing it", exc)
        self.ray.kill(self.actor)


def placer(cluster: RayCluster) -> Callable[[Callable[..., BatchReward], ServiceRewardConfig], BatchReward]:
    """What rewards/scoring.build_scorer calls to start a placeable reward in its own actor."""
    return lambda factory, cfg: RemoteReward(cluster, factory, cfg)
