"""How shared rollouts travel between nodes (`swarm.transport` in the job).

Every transport moves opaque messages (bytes) and must never stall a node: `publish` returns at once
(sending happens in the background or is fire-and-forget), `receive` returns what has arrived since
the last call within `timeout_s`, and an unreachable peer, hub or exchange only costs a counted error.

* memory: nodes in one process share a Board (tests, the lock-step launcher, the benchmark);
* http:   separate processes or machines through an HTTP hub (rl/swarm/hub.py: why HTTP);
* ray:    nodes on one Ray cluster through a named exchange actor (rl/swarm/ray_transport.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from rl.registries import SWARM_TRANSPORTS
from rl.swarm.hub import MAX_PAGE, Board, Hub

if TYPE_CHECKING:
    from rl.config import swarm as config  # its section classes share the transports' names

log = logging.getLogger(__name__)


class Transport(Protocol):
    errors: int  # failed or dropped sends and receives so far

    def publish(self, messages: Sequence[bytes]) -> None: ...

    def receive(self) -> list[bytes]: ...

    def close(self) -> None: ...


def build_transport(cfg: config.SwarmTransportConfig, max_message_bytes: int) -> Transport:
    return SWARM_TRANSPORTS.get(cfg.name)(cfg, max_message_bytes)


# ----- memory ---------------------------------------------------------------------------------
_BOARDS: dict[str, Board] = {}
_BOARDS_LOCK = threading.Lock()


def memory_board(name: str) -> Board:
    with _BOARDS_LOCK:
        return _BOARDS.setdefault(name, Board())


def reset_memory_board(name: str) -> None:
    """Forget a board (a new swarm with the same name starts empty)."""
    with _BOARDS_LOCK:
        _BOARDS.pop(name, None)


@SWARM_TRANSPORTS.register("memory")
class MemoryTransport:
    def __init__(self, cfg: config.MemoryTransport, max_message_bytes: int = 1_000_000) -> None:
        self.board = memory_board(cfg.board)
        self.cursor = 0
        self.errors = 0

    def publish(self, messages: Sequence[bytes]) -> None:
        for m in messages:
            self.board.post(m)

    def receive(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            self.cursor, page = self.board.since(self.cursor)
            out += page
            if len(page) < MAX_PAGE:
                return out

    def close(self) -> None:
        pass


# ----- http -----------------------------------------------------------------------------------
@SWARM_TRANSPORTS.register("http")
class HttpTransport:
    """A client of an HTTP hub; with `serve: true` it first tries to host the hub itself."""

    QUEUE = 256  # messages waiting to be sent; more are dropped (and counted) rather than block a step

    def __init__(self, cfg: config.HttpTransport, max_message_bytes: int = 1_000_000) -> None:
        self.url, self.timeout_s = cfg.url.rstrip("/"), cfg.timeout_s
        self.max_response_bytes = MAX_PAGE * (max_message_bytes + 64) + 1024
        self.hub = _try_serve(self.url, max_message_bytes) if cfg.serve else None
        self.cursor, self.errors, self.board_id = 0, 0, ""
        self._outbox: queue.Queue[bytes | None] = queue.Queue(self.QUEUE)
        self._sender = threading.Thread(target=self._send_loop, name="swarm-http-send", daemon=True)
        self._sender.start()

    def publish(self, messages: Sequence[bytes]) -> None:
        for m in messages:
            try:
                self._outbox.put_nowait(m)
            except queue.Full:
                self.errors += 1

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            request = urllib.request.Request(f"{self.url}/messages", data=message, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read(1024)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                self.errors += 1
                log.debug("swarm: publishing to %s failed: %s", self.url, exc)
            finally:
                self._outbox.task_done()

    def receive(self) -> list[bytes]:
        try:
            board, nxt, messages = self._get(self.cursor)
            if board != self.board_id:  # first read, or the hub restarted: its sequence began again
                self.board_id = board
                if self.cursor:
                    board, nxt, messages = self._get(0)
        except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
            self.errors += 1
            log.debug("swarm: reading from %s failed: %s", self.url, exc)
            return []
        self.cursor = nxt
        return [m.encode("utf-8") for m in messages]

    def _get(self, cursor: int) -> tuple[str, int, list[str]]:
        url = f"{self.url}/messages?after={cursor}&limit={MAX_PAGE}"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
            data = response.read(self.max_response_bytes + 1)
        if len(data) > self.max_response_bytes:
            raise ValueError("hub response too large")
        page = json.loads(data)
        messages = page["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
            raise ValueError("hub response has no list of messages")
        return str(page["board"]), int(page["next"]), messages

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until every queued message has been sent or has failed."""
        deadline = time.monotonic() + timeout_s
        while self._outbox.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._outbox.put_nowait(None)
        self._sender.join(timeout=self.timeout_s + 1)
        if self.hub is not None:
            self.hub.close()


def _try_serve(url: str, max_message_bytes: int) -> Hub | None:
    """Host the hub at the url's host:port unless something already listens there."""
    parsed = urlparse(url)
    try:
        hub = Hub(parsed.hostname or "127.0.0.1", parsed.port or 80, max_message_bytes=max_message_bytes)
    except OSError as exc:
        log.info("swarm: not hosting a hub at %s (%s); joining the one there", url, exc)
        return None
    log.info("swarm: hosting the hub at %s", hub.url)
    return hub
