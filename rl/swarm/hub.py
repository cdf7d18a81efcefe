"""Where shared rollouts wait for readers: a bounded, expiring message board, and an HTTP hub serving one.

Why HTTP from the standard library for nodes without a shared Ray cluster: it needs no new dependency,
crosses machines and firewalls that allow one port, every call has a timeout, and a hub holds no node
state, so nodes join (they read the recent backlog) and leave (their messages expire) at any time.
The hub stores opaque messages; every node validates what it reads (rl/swarm/validation.py).

    rl swarm-hub --host 0.0.0.0 --port 8765                    # on one machine
    swarm: {transport: {name: http, url: http://HUB:8765}}     # in every node's job

HTTP API: POST /messages (body = one message, UTF-8) -> {"seq": n}; GET /messages?after=N&limit=M ->
{"board": id, "next": cursor, "messages": [...]}; GET /health -> {"messages": count}. Oversized bodies get 413.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MAX_PAGE = 256  # messages per GET


class Board:
    """An append-only, bounded, expiring sequence of messages; readers keep their own cursor."""

    def __init__(self, max_messages: int = 4096, ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.max_messages, self.ttl_s, self.clock = max_messages, ttl_s, clock
        self._items: deque[tuple[int, float, bytes]] = deque()
        self._next = 0
        self._lock = threading.Lock()
        self.id = uuid.uuid4().hex  # readers notice a restarted hub (new sequence) by a new id

    def post(self, message: bytes) -> int:
        with self._lock:
            seq, self._next = self._next, self._next + 1
            self._items.append((seq, self.clock(), bytes(message)))
            while len(self._items) > self.max_messages:
                self._items.popleft()
            return seq

    def since(self, cursor: int, limit: int = MAX_PAGE) -> tuple[int, list[bytes]]:
        """(next cursor, up to `limit` unexpired messages with seq >= cursor)."""
        with self._lock:
            oldest = self.clock() - self.ttl_s
            while self._items and self._items[0][1] < oldest:
                self._items.popleft()
            page = [(s, m) for s, _, m in self._items if s >= cursor][: max(limit, 0)]
            nxt = page[-1][0] + 1 if page else max(cursor, self._items[0][0] if self._items else self._next)
            return nxt, [m for _, m in page]

    def __len__(self) -> int:
        return len(self._items)


def _handler(board: Board, max_message_bytes: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a client may take to send its request (a stalled peer frees its thread)

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/messages":
                return self._reply(404, {"error": "not found"})
            length = int(self.headers.get("Content-Length") or -1)
            if not 0 < length <= max_message_bytes:
                self.close_connection = True
                return self._reply(413, {"error": f"body must be 1..{max_message_bytes} bytes"})
            body = self.rfile.read(length)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                return self._reply(400, {"error": "body must be UTF-8"})
            self._reply(200, {"seq": board.post(body)})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/health":
                return self._reply(200, {"messages": len(board)})
            if url.path != "/messages":
                return self._reply(404, {"error": "not found"})
            try:
                query = parse_qs(url.query)
                after, limit = int(query.get("after", ["0"])[0]), int(query.get("limit", [str(MAX_PAGE)])[0])
            except ValueError:
                return self._reply(400, {"error": "after and limit must be integers"})
            nxt, messages = board.since(after, min(limit, MAX_PAGE))
            self._reply(200, {"board": board.id, "next": nxt, "messages": [m.decode("utf-8") for m in messages]})

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet by default
            pass

    return Handler


class Hub:
    """An HTTP hub on (host, port) serving a Board from a daemon thread; port 0 picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, max_messages: int = 4096, ttl_s: float = 600.0,
                 max_message_bytes: int = 1_000_000) -> None:
        self.board = Board(max_messages, ttl_s)
        self.server = ThreadingHTTPServer((host, port), _handler(self.board, max_message_bytes))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="swarm-hub", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        assert isinstance(host, str), host  # AF_INET: (host, port); typeshed also allows an AF_UNIX bytes path
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
