"""Transports move messages between real endpoints: the in-process board and the HTTP hub (stdlib)."""

import socket
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from rl.config.swarm import HttpTransport as HttpConfig
from rl.swarm.hub import Board, Hub
from rl.swarm.transports import HttpTransport, MemoryTransport, reset_memory_board


def http_cfg(url, serve=False, timeout_s=1.0):
    return HttpConfig(url=url, serve=serve, timeout_s=timeout_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_board_pages_expire_and_bound_their_size():
    now = [0.0]
    board = Board(max_messages=3, ttl_s=10, clock=lambda: now[0])
    for i in range(5):
        board.post(b"m%d" % i)
    assert board.since(0) == (5, [b"m2", b"m3", b"m4"])  # the two oldest were pushed out
    assert board.since(5) == (5, [])
    assert board.since(3, limit=1) == (4, [b"m3"])
    now[0] = 20.0
    assert board.since(0) == (5, [])


def test_memory_transports_on_one_board_see_each_other_once():
    reset_memory_board("t")
    a, b = (MemoryTransport(SimpleNamespace(board="t")) for _ in range(2))
    a.publish([b"x", b"y"])
    assert b.receive() == [b"x", b"y"] and b.receive() == []
    b.publish([b"z"])
    assert a.receive() == [b"x", b"y", b"z"]  # a reads its own too (the node skips its own id)


def test_http_exchange_through_a_hub_and_a_late_joiner_gets_the_backlog():
    hub = Hub("127.0.0.1", 0)
    try:
        a, b = HttpTransport(http_cfg(hub.url)), HttpTransport(http_cfg(hub.url))
        a.publish([b'{"n": 1}', b'{"n": 2}'])
        a.flush()
        assert b.receive() == [b'{"n": 1}', b'{"n": 2}'] and b.receive() == []
        late = HttpTransport(http_cfg(hub.url))
        assert len(late.receive()) == 2
        assert a.errors == b.errors == late.errors == 0
        for t in (a, b, late):
            t.close()
    finally:
        hub.close()


def test_hub_refuses_oversized_and_non_utf8_bodies():
    hub = Hub("127.0.0.1", 0, max_message_bytes=100)
    try:
        for body, code in ((b"x" * 101, 413), (b"\xff\xfe", 400)):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(urllib.request.Request(f"{hub.url}/messages", data=body, method="POST"),
                                       timeout=5)
            assert info.value.code == code
        assert len(hub.board) == 0
    finally:
        hub.close()


def test_a_dead_hub_never_stalls_a_node():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = HttpTransport(http_cfg(url, timeout_s=0.5))
    start = time.perf_counter()
    t.publish([b"m"] * (HttpTransport.QUEUE + 50))  # returns at once; what does not fit is dropped
    assert time.perf_counter() - start < 0.5
    assert t.receive() == []
    assert time.perf_counter() - start < 3.0
    assert t.errors >= 51  # 50 dropped sends + 1 failed read (plus failed sends in the background)
    t.close()


def test_a_hub_that_dies_mid_run_costs_errors_not_a_hang_and_a_new_one_is_rejoined():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = HttpTransport(http_cfg(url, serve=True, timeout_s=0.5))  # hosts the hub
    peer = HttpTransport(http_cfg(url, serve=True, timeout_s=0.5))  # port taken: joins it
    assert node.hub is not None and peer.hub is None
    peer.publish([b"a"])
    peer.flush()
    assert node.receive() == [b"a"]
    node.hub.close()
    node.hub = None
    assert node.receive() == [] and node.errors == 1
    new_hub = Hub("127.0.0.1", port)
    try:
        peer.publish([b"b"])
        peer.flush()
        assert node.receive() == [b"b"]
    finally:
        node.close()
        peer.close()
        new_hub.close()
