"""Where shared rollouts wait for readers: a bounded, expiring message board, and an HTTP hub serving one.

Why HTTP from the standard library for nodes without a shared Ray cluster: it needs no new dependency,
crosses machines and firewalls that allow one port, every call has a timeout, and a hub holds no node
state, so nodes join (they read the recent backlog) and leave (their messages expire) at any time.
The hub stores opaque messages; every node validates what it reads (rl/swarm/validation.py).

    RLPOST_SWARM_TOKEN=... rl swarm-hub --host 0.0.0.0 --port 8765   # on one machine
    swarm: {transport: {name: http, url: http://HUB:8765}}             # in every node's job (same variable set)

An open port is guarded (rl/netauth.py: who is a client, what a token holder can still do): beyond loopback the
hub needs a shared token, sent as `Authorization: Bearer <token>` on every GET and POST; each client (address +
`X-Rlpost-Client` id) has a token-bucket rate limit; a full board evicts from the sender holding the most
messages, so a flood cannot push the others out; TLS with `tls_cert`/`tls_key`.

HTTP API: POST /messages (body = one message, UTF-8) -> {"seq": n}; GET /messages?after=N&limit=M ->
{"board": id, "next": cursor, "messages": [...]}; GET /health -> {"messages": count}, open without the token
(for probes and proxies: a count, nothing else). 401: no or wrong token; 429 + Retry-After: over the rate limit;
413: oversized body.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar, Generic, TypeVar
from urllib.parse import parse_qs, urlparse

from rl.netauth import CLIENT_HEADER, Access, Guard, client_id, exposure_line, require_token, send_json, server_tls

log = logging.getLogger(__name__)
MAX_PAGE = 256  # messages per GET
TOKEN_ENV = "RLPOST_SWARM_TOKEN"  # the default of swarm.transport.token_env
Sender = tuple[str, str]  # (address or transport kind, client id within it)
K = TypeVar("K", bound=Hashable)


class _Counts(Generic[K]):
    """Message counts per key, the largest found in O(1): keys bucketed by count, as an LFU cache keeps them."""

    def __init__(self) -> None:
        self.count: dict[K, int] = {}
        self._by_count: dict[int, dict[K, None]] = {}
        self._top = 0

    def add(self, key: K, delta: int) -> None:
        old = self.count.pop(key, 0)
        if old:
            bucket = self._by_count[old]
            del bucket[key]
            if not bucket:
                del self._by_count[old]
        if (new := old + delta) > 0:
            self.count[key] = new
            self._by_count.setdefault(new, {})[key] = None
            self._top = max(self._top, new)
        while self._top and self._top not in self._by_count:
            self._top -= 1

    def largest(self) -> K:
        return next(iter(self._by_count[self._top]))

    def __bool__(self) -> bool:
        return bool(self.count)


class Board:
    """An append-only, bounded, expiring sequence of messages; readers keep their own cursor.

    When full, the board evicts the oldest message of the sender holding the most: first the address (or
    transport) holding the most, then its client holding the most. A sender flooding the board then holds at
    most an equal share, and honest senders below that share lose nothing (globally-oldest eviction would let
    a flood of 10x the board push out every other message). Expiry (`ttl_s`) is by age, for everyone alike.
    """

    def __init__(self, max_messages: int = 4096, ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.max_messages, self.ttl_s, self.clock = max_messages, ttl_s, clock
        self._items: dict[int, tuple[float, Sender, bytes]] = {}  # seq -> (posted at, sender, message); seq order
        self._order: deque[int] = deque()  # every seq posted, oldest first; evicted ones are skipped lazily
        self._queues: dict[Sender, deque[int]] = {}  # a sender's seqs, oldest first
        self._groups: _Counts[str] = _Counts()
        self._clients: dict[str, _Counts[str]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.id = uuid.uuid4().hex  # readers notice a restarted hub (new sequence) by a new id

    def post(self, message: bytes, sender: Sender = ("", "")) -> int:
        with self._lock:
            self._expire()
            seq, self._next = self._next, self._next + 1
            self._items[seq] = (self.clock(), sender, bytes(message))
            self._order.append(seq)
            self._queues.setdefault(sender, deque()).append(seq)
            self._count(sender, +1)
            while len(self._items) > self.max_messages:
                group = self._groups.largest()
                self._remove(self._queues[(group, self._clients[group].largest())][0])
            if len(self._order) > 2 * self.max_messages + 64:  # evicted seqs pile up behind live ones
                self._order = deque(s for s in self._order if s in self._items)
            return seq

    def since(self, cursor: int, limit: int = MAX_PAGE) -> tuple[int, list[bytes]]:
        """(next cursor, up to `limit` unexpired messages with seq >= cursor)."""
        with self._lock:
            self._expire()
            page = [(s, m) for s, (_, _, m) in self._items.items() if s >= cursor][: max(limit, 0)]
            nxt = page[-1][0] + 1 if page else max(cursor, self._order[0] if self._order else self._next)
            return nxt, [m for _, m in page]

    def _expire(self) -> None:
        """Drop expired messages (and skipped seqs) from the front; afterwards `_order[0]` is live."""
        oldest = self.clock() - self.ttl_s
        while self._order:
            item = self._items.get(self._order[0])
            if item is not None and item[0] >= oldest:
                return
            seq = self._order.popleft()
            if item is not None:
                self._remove(seq)

    def _remove(self, seq: int) -> None:
        """Remove `seq`, the oldest message of its sender."""
        _, sender, _ = self._items.pop(seq)
        queue = self._queues[sender]
        queue.popleft()
        if not queue:
            del self._queues[sender]
        self._count(sender, -1)

    def _count(self, sender: Sender, delta: int) -> None:
        group, client = sender
        self._groups.add(group, delta)
        clients = self._clients.setdefault(group, _Counts())
        clients.add(client, delta)
        if not clients:
            del self._clients[group]

    def __len__(self) -> int:
        return len(self._items)


class _Handler(BaseHTTPRequestHandler):
    """The HTTP API; `_handler` binds a board, its size limit and its guard (the server builds one per request)."""

    board: ClassVar[Board]
    max_message_bytes: ClassVar[int]
    guard: ClassVar[Guard]

    timeout = 10  # seconds a client may take to send its request (a stalled peer frees its thread)

    def _reply(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
        send_json(self, code, body, headers)

    def _sender(self) -> Sender:
        return str(self.client_address[0]), client_id(self.headers.get(CLIENT_HEADER))

    def _refused(self) -> bool:
        """Answer 401 or 429 (and return True) unless the request may go on; its body is never read."""
        address, client = self._sender()
        verdict = self.guard.check(self.headers.get("Authorization"), address, client)
        if verdict.status == 200:
            return False
        self.close_connection = True
        if verdict.status == 401:
            self._reply(401, {"error": "a valid bearer token is required"}, {"WWW-Authenticate": "Bearer"})
        else:
            self._reply(429, {"error": "rate limit exceeded"}, {"Retry-After": str(verdict.retry_after_s)})
        return True

    def do_POST(self) -> None:
        if urlparse(self.path).path != "/messages":
            return self._reply(404, {"error": "not found"})
        if self._refused():
            return None
        length = int(self.headers.get("Content-Length") or -1)
        if not 0 < length <= self.max_message_bytes:
            self.close_connection = True
            return self._reply(413, {"error": f"body must be 1..{self.max_message_bytes} bytes"})
        body = self.rfile.read(length)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return self._reply(400, {"error": "body must be UTF-8"})
        self._reply(200, {"seq": self.board.post(body, self._sender())})

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/health":
            return self._reply(200, {"messages": len(self.board)})
        if url.path != "/messages":
            return self._reply(404, {"error": "not found"})
        if self._refused():
            return None
        try:
            query = parse_qs(url.query)
            after, limit = int(query.get("after", ["0"])[0]), int(query.get("limit", [str(MAX_PAGE)])[0])
        except ValueError:
            return self._reply(400, {"error": "after and limit must be integers"})
        nxt, messages = self.board.since(after, min(limit, MAX_PAGE))
        self._reply(200, {"board": self.board.id, "next": nxt, "messages": [m.decode("utf-8") for m in messages]})

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet by default
        pass


def _handler(board: Board, max_message_bytes: int, guard: Guard) -> type[_Handler]:
    return type("Handler", (_Handler,), {"board": board, "max_message_bytes": max_message_bytes, "guard": guard})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A port on the network meets scanners, plain HTTP sent to TLS, dropped connections: not worth a traceback.
        log.debug("swarm hub: a request from %s failed", client_address, exc_info=True)


class Hub:
    """An HTTP(S) hub on (host, port) serving a Board from a daemon thread; port 0 picks a free port.

    Beyond loopback it refuses to start without `token`; `rate_per_s` None turns rate limiting off;
    `tls_cert` + `tls_key` (PEM files) serve HTTPS.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, max_messages: int = 4096, ttl_s: float = 600.0,
                 max_message_bytes: int = 1_000_000, *, token: str | None = None,
                 rate_per_s: float | None = Access.rate_per_s, burst: int = Access.burst,
                 clients_per_ip: int = Access.clients_per_ip, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        require_token(host, token, "the swarm hub",
                      f"Give one with `rl swarm-hub --token-file PATH` or the environment variable {TOKEN_ENV} "
                      "(with `serve: true`: the variable swarm.transport.token_env names), the same on every node")
        self.access = Access(token, rate_per_s, burst, clients_per_ip)
        context = server_tls(tls_cert, tls_key)
        self.tls = context is not None
        self.board = Board(max_messages, ttl_s)
        self.server = _Server((host, port), _handler(self.board, max_message_bytes, Guard(self.access)))
        if context is not None:  # the handshake runs on the handler's thread (under its timeout), not accept()'s
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self.thread = threading.Thread(target=self.server.serve_forever, name="swarm-hub", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        assert isinstance(host, str), host  # AF_INET: (host, port); typeshed also allows an AF_UNIX bytes path
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def exposure(self) -> str:
        """One line: where the hub listens and what guards it (rl/netauth.py `exposure_line`)."""
        host, port = self.server.server_address[:2]
        return exposure_line(str(host), int(port), self.access, self.tls)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
