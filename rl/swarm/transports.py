"""How shared rollouts travel between nodes (`swarm.transport` in the job).

Every transport moves opaque messages (bytes) and must never stall a node: `publish` returns at once
(sending happens in the background or is fire-and-forget), `receive` returns what has arrived since
the last call within `timeout_s`, and an unreachable peer, hub or exchange only costs a counted error.

* memory: nodes in one process share a Board (tests, the lock-step launcher, the benchmark);
* http:   separate processes or machines through an HTTP hub (rl/swarm/hub.py: why HTTP); the shared token
          comes from the environment variable `token_env` names, never from the job file;
* ray:    nodes on one Ray cluster through a named exchange actor (rl/swarm/ray_transport.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from rl.errors import UserError
from rl.netauth import CLIENT_HEADER, client_tls
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
        self.sender = ("memory", uuid.uuid4().hex[:16])  # a board's fair eviction keeps each transport's share
        self.cursor = 0
        self.errors = 0

    def publish(self, messages: Sequence[bytes]) -> None:
        for m in messages:
            self.board.post(m, self.sender)

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
    """A client of an HTTP(S) hub; with `serve: true` it first tries to host the hub itself.

    Every request carries the token (from the environment variable `cfg.token_env`) as a bearer token and
    this transport's random client id; a 401 is a misconfiguration and fails the node (UserError, raised by
    the next `receive`), a 429 makes the sender wait the hub's Retry-After.
    """

    QUEUE = 256  # messages waiting to be sent; more are dropped (and counted) rather than block a step
    MAX_RETRY_WAIT_S = 10.0  # most a sender waits on one 429 before trying again
    RETRIES = 3  # 429s in a row after which a message is dropped (counted)

    def __init__(self, cfg: config.HttpTransport, max_message_bytes: int = 1_000_000) -> None:
        self.url, self.timeout_s, self.token_env = cfg.url.rstrip("/"), cfg.timeout_s, cfg.token_env
        self.token = os.environ.get(cfg.token_env) or None
        self.headers = {CLIENT_HEADER: uuid.uuid4().hex[:16]}
        if self.token is not None:
            self.headers["Authorization"] = f"Bearer {self.token}"
        self.context: ssl.SSLContext | None = client_tls(cfg.ca_file) if self.url.startswith("https:") else None
        self.max_response_bytes = MAX_PAGE * (max_message_bytes + 64) + 1024
        self.hub = _try_serve(self.url, max_message_bytes, self.token) if cfg.serve else None
        self.cursor, self.errors, self.board_id = 0, 0, ""
        self.refused: str | None = None  # why the hub answered 401 (raised by the next receive)
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
            try:
                self._send(message)
            finally:
                self._outbox.task_done()

    def _send(self, message: bytes) -> None:
        request = urllib.request.Request(f"{self.url}/messages", data=message, method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        for _ in range(self.RETRIES):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
                    response.read(1024)
                return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    self.refused = self._refusal()
                if exc.code != 429:
                    break
                time.sleep(min(_retry_after_s(exc), self.MAX_RETRY_WAIT_S))
            except (OSError, urllib.error.URLError, ValueError) as exc:
                log.debug("swarm: publishing to %s failed: %s", self.url, exc)
                break
        self.errors += 1

    def _refusal(self) -> str:
        if self.token is None:
            return (f"the swarm hub at {self.url} refused this node (401): the hub requires a token and this node "
                    f"has no token. Set the environment variable {self.token_env} to the hub's token (the job names "
                    "only the variable, swarm.transport.token_env; the token itself never goes in the job file).")
        return (f"the swarm hub at {self.url} refused this node's token (401), read from the environment variable "
                f"{self.token_env}: set it to the token the hub was started with (`rl swarm-hub --token-file`).")

    def receive(self) -> list[bytes]:
        if self.refused:
            raise UserError(self.refused)
        try:
            board, nxt, messages = self._get(self.cursor)
            if board != self.board_id:  # first read, or the hub restarted: its sequence began again
                self.board_id = board
                if self.cursor:
                    board, nxt, messages = self._get(0)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise UserError(self._refusal()) from None
            self.errors += 1
            log.debug("swarm: reading from %s failed: %s", self.url, exc)
            return []
        except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
            self.errors += 1
            log.debug("swarm: reading from %s failed: %s", self.url, exc)
            return []
        self.cursor = nxt
        return [m.encode("utf-8") for m in messages]

    def _get(self, cursor: int) -> tuple[str, int, list[str]]:
        request = urllib.request.Request(f"{self.url}/messages?after={cursor}&limit={MAX_PAGE}", headers=self.headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
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


def _retry_after_s(error: urllib.error.HTTPError) -> float:
    try:
        return max(float(error.headers.get("Retry-After") or 1), 0.0)
    except ValueError:
        return 1.0


def _try_serve(url: str, max_message_bytes: int, token: str | None) -> Hub | None:
    """Host the hub (with this node's token) at the url's host:port unless something already listens there."""
    parsed = urlparse(url)
    try:
        hub = Hub(parsed.hostname or "127.0.0.1", parsed.port or 80, max_message_bytes=max_message_bytes,
                  token=token)
    except OSError as exc:
        log.info("swarm: not hosting a hub at %s (%s); joining the one there", url, exc)
        return None
    print(f"swarm hub (serve: true) {hub.exposure()}", file=sys.stderr, flush=True)
    return hub
