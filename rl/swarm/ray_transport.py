"""The Ray transport: nodes on one Ray cluster share rollouts through a named, detached exchange actor.

The first node to look for the exchange creates it (`get_if_exists`), later ones join it; being
detached, it outlives any node, so nodes join and leave freely. Sends are fire-and-forget; reads wait
at most `timeout_s`. If the exchange dies, reads fail (counted) and the next read re-creates it: the
node trains on its own rollouts meanwhile. Ray is imported inside functions, so `rl --help` stays fast
(the swarm's only Ray module, as rl/cluster.py is the placement's).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from rl.errors import UserError
from rl.registries import SWARM_TRANSPORTS
from rl.swarm.hub import MAX_PAGE, Board

log = logging.getLogger(__name__)
NAMESPACE = "rlpost-swarm"


class SwarmExchange:
    """The actor: a Board behind two methods."""

    def __init__(self, max_messages: int = 4096, ttl_s: float = 600.0) -> None:
        self.board = Board(max_messages, ttl_s)

    def publish(self, messages: list[bytes]) -> int:
        for m in messages:
            self.board.post(m)
        return len(self.board)

    def since(self, cursor: int, limit: int = MAX_PAGE) -> tuple[int, list[bytes]]:
        return self.board.since(cursor, limit)


def ensure_ray(address: str | None) -> Any:
    import ray

    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "RLPOST", "TRANSFORMERS_"))}
        try:
            ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": env},
                     namespace=NAMESPACE, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"could not start or join a Ray cluster (swarm.transport.address={address!r}): {exc}. "
                            "Start one with `ray start --head`, or set the address to null.") from None
    return ray


def exchange_actor(ray: Any, name: str) -> Any:
    """The named exchange actor, created if no node has created it yet."""
    cls = ray.remote(num_cpus=0, max_concurrency=16)(SwarmExchange)
    return cls.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


@SWARM_TRANSPORTS.register("ray")
class RayTransport:
    def __init__(self, cfg: Any, max_message_bytes: int = 1_000_000) -> None:
        self.ray = ensure_ray(cfg.address)
        self.name, self.timeout_s = cfg.exchange, cfg.timeout_s
        self.actor: Any = exchange_actor(self.ray, self.name)
        self.cursor, self.errors = 0, 0

    def publish(self, messages: Sequence[bytes]) -> None:
        if not messages:
            return
        try:
            self.actor.publish.remote(list(messages))  # fire and forget: never waits for the exchange
        except Exception as exc:  # noqa: BLE001 - any Ray failure here only means "not shared this time"
            self.errors += 1
            log.debug("swarm: publishing to the exchange failed: %s", exc)

    def receive(self) -> list[bytes]:
        errors = (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError,
                  self.ray.exceptions.RaySystemError)
        try:
            self.cursor, page = self.ray.get(self.actor.since.remote(self.cursor), timeout=self.timeout_s)
            return page
        except errors as exc:
            self.errors += 1
            log.warning("swarm: the exchange actor did not answer (%s); training on local rollouts", type(exc).__name__)
            self._rejoin()
            return []

    def _rejoin(self) -> None:
        """After a failure: join (or re-create) the exchange; a new exchange starts at cursor 0."""
        try:
            actor = exchange_actor(self.ray, self.name)
        except Exception as exc:  # noqa: BLE001
            log.debug("swarm: rejoining the exchange failed: %s", exc)
            return
        if actor._actor_id != self.actor._actor_id:
            self.actor, self.cursor = actor, 0

    def close(self) -> None:
        pass


def kill_exchange(name: str) -> None:
    """Remove a swarm's exchange actor (the launcher does this when its swarm ends)."""
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
