"""The Ray transport: nodes on one Ray cluster share rollouts through a named, detached exchange actor.

The first node to look for the exchange creates it (`get_if_exists`), later ones join it; being
detached, it outlives any node, so nodes join and leave freely. Sends are fire-and-forget; reads wait
at most `timeout_s`. If the exchange dies, reads fail (counted) and later calls re-create or join a new
one (rollouts published meanwhile are lost); the node trains on its own rollouts in between.
Ray is imported inside functions, so `rl --help` stays fast (the swarm's only Ray module, as
rl/loop/cluster.py is the placement's).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.registries import SWARM_TRANSPORTS
from rl.swarm.hub import MAX_PAGE, Board

if TYPE_CHECKING:
    from types import ModuleType

    from ray import ObjectRef
    from ray.actor import ActorHandle

    from rl.config import swarm as config

log = logging.getLogger(__name__)
NAMESPACE = "rlpost-swarm"


class SwarmExchange:
    """The actor: a Board behind two methods."""

    def __init__(self, max_messages: int = 4096, ttl_s: float = 600.0) -> None:
        self.board = Board(max_messages, ttl_s)

    def publish(self, messages: list[bytes], sender: str = "") -> int:
        for m in messages:
            self.board.post(m, ("ray", sender))  # the board's fair eviction keeps each node's share
        return len(self.board)

    def since(self, cursor: int, limit: int = MAX_PAGE) -> tuple[int, list[bytes]]:
        return self.board.since(cursor, limit)


def ensure_ray(address: str | None) -> ModuleType:
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


def exchange_actor(ray: ModuleType, name: str) -> ActorHandle:
    """The named exchange actor, created if no node has created it yet."""
    cls = ray.remote(num_cpus=0, max_concurrency=16)(SwarmExchange)
    return cls.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


@SWARM_TRANSPORTS.register("ray")
class RayTransport:
    def __init__(self, cfg: config.RayTransport, max_message_bytes: int = 1_000_000) -> None:
        self.ray = ensure_ray(cfg.address)
        self.name, self.timeout_s = cfg.exchange, cfg.timeout_s
        self.actor: ActorHandle = exchange_actor(self.ray, self.name)
        self.cursor, self.errors, self._broken = 0, 0, False
        self.sender = uuid.uuid4().hex[:16]
        self._last_publish: ObjectRef | None = None

    def publish(self, messages: Sequence[bytes]) -> None:
        if not messages:
            return
        if self._broken and not self._rejoin():
            self.errors += 1
            return
        try:
            self._last_publish = self.actor.publish.remote(list(messages), self.sender)  # fire and forget: never waits
        except Exception as exc:  # noqa: BLE001 - any Ray failure here only means "not shared this time"
            self.errors += 1
            log.debug("swarm: publishing to the exchange failed: %s", exc)

    def receive(self) -> list[bytes]:
        errors = (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError,
                  self.ray.exceptions.RaySystemError)
        if self._broken and not self._rejoin():
            return []
        try:
            self.cursor, page = self.ray.get(self.actor.since.remote(self.cursor), timeout=self.timeout_s)
            return page
        except errors as exc:
            self.errors += 1
            self._broken = True
            log.warning("swarm: the exchange actor did not answer (%s); training on local rollouts", type(exc).__name__)
            return []

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) until the last publish reached the exchange (tests; sends are otherwise async)."""
        if self._last_publish is not None:
            try:
                self.ray.get(self._last_publish, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - a lost send is only counted
                self.errors += 1
                log.debug("swarm: a publish did not arrive: %s", exc)

    def _rejoin(self) -> bool:
        """After a failure: join (or re-create) the exchange; True once a live one (not the dead one) is
        found. A dead actor's name is released asynchronously, so this is retried on later calls."""
        try:
            actor = exchange_actor(self.ray, self.name)
        except Exception as exc:  # noqa: BLE001
            log.debug("swarm: rejoining the exchange failed: %s", exc)
            return False
        if actor._actor_id == self.actor._actor_id:
            return False
        self.actor, self.cursor, self._broken = actor, 0, False  # a new exchange's sequence starts at 0
        return True

    def close(self) -> None:
        pass


def kill_exchange(name: str, wait_s: float = 30.0) -> None:
    """Remove a swarm's exchange actor (the launcher does this when its swarm ends)."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return
    ray.kill(actor)
    # ray.kill only requests the kill: wait until calls fail, so nobody reads the old exchange after this.
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.since.remote(0), timeout=1.0)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
