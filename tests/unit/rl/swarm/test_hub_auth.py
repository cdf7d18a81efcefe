"""The hub's open port, tried as an outsider and as a flooding insider would: real servers and clients on loopback.

A hub refuses requests without the shared token (401, nothing stored or shown), refuses to listen beyond loopback
without one, keeps two honest nodes' rollouts through a flood of 10x its board (fair eviction and a per-client rate
limit), says at start-up what it is exposed to, and speaks TLS.
"""

import datetime
import http.client
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config.swarm import HttpTransport as HttpConfig
from rl.errors import UserError
from rl.swarm.hub import TOKEN_ENV, Board, Hub
from rl.swarm.transports import HttpTransport

TOKEN = "0123456789abcdef-swarm-token"
REPO = Path(__file__).resolve().parents[4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(hub, method, path="/messages", body=None, token=None, client=None, source="127.0.0.1", headers=None):
    """(status, headers, body) of one raw request from `source` (a loopback address)."""
    host, port = hub.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5, source_address=(source, 0))
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if client is not None:
        hdrs["X-Rlpost-Client"] = client
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def node(url, **kw) -> HttpTransport:
    return HttpTransport(HttpConfig(url=url, timeout_s=2.0, **kw))


def messages_of(url) -> list[bytes]:
    reader, out = node(url), []
    while page := reader.receive():
        out += page
    reader.close()
    return out


# ----- 1. authentication ------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}])
def test_a_request_without_or_with_a_wrong_token_gets_401_and_stores_and_shows_nothing(headers):
    hub = Hub("127.0.0.1", 0, token=TOKEN)
    try:
        hub.board.post(b'{"secret": "rollout"}')
        status, got_headers, body = request(hub, "POST", body=b'{"junk": 1}', headers=headers)
        assert status == 401 and got_headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert len(hub.board) == 1  # nothing stored
        status, _, body = request(hub, "GET", "/messages?after=0", headers=headers)
        assert status == 401 and b"secret" not in body  # reading a private swarm is exposure too
        status, _, body = request(hub, "GET", "/health", headers=headers)
        assert status == 200 and json.loads(body) == {"messages": 1}  # open for probes: a count, nothing else
        status, _, body = request(hub, "POST", body=b'{"good": 1}', token=TOKEN)
        assert status == 200 and len(hub.board) == 2
    finally:
        hub.close()


def test_nodes_with_the_token_exchange_rollouts_and_a_node_without_it_gets_a_clear_error(monkeypatch):
    hub = Hub("127.0.0.1", 0, token=TOKEN)
    try:
        monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
        a, b = node(hub.url), node(hub.url)
        a.publish([b'{"n": 1}', b'{"n": 2}'])
        a.flush()
        b.publish([b'{"n": 3}'])
        b.flush()
        everything = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
        assert b.receive() == everything and a.receive() == everything
        assert a.errors == b.errors == 0
        monkeypatch.setenv("MY_SWARM_TOKEN", "not-the-token")
        monkeypatch.delenv("RLPOST_SWARM_TOKEN")
        for t in (a, b):
            t.close()
        for cfg, words in (({}, ["RLPOST_SWARM_TOKEN", "401", "has no token"]),
                           ({"token_env": "MY_SWARM_TOKEN"}, ["MY_SWARM_TOKEN", "401", "refused"])):
            lost = node(hub.url, **cfg)
            lost.publish([b'{"n": 4}'])
            lost.flush()
            with pytest.raises(UserError) as info:
                lost.receive()
            assert all(w in str(info.value) for w in words), str(info.value)
            lost.close()
        assert len(hub.board) == 3  # the tokenless node stored nothing
    finally:
        hub.close()


def test_a_hub_beyond_loopback_without_a_token_refuses_to_start():
    with pytest.raises(UserError) as info:
        Hub("0.0.0.0", 0)
    assert "--token-file" in str(info.value) and "RLPOST_SWARM_TOKEN" in str(info.value)
    Hub("127.0.0.1", 0).close()  # loopback: a token is optional


@pytest.mark.parametrize("settings, words", [
    ({"token": "short"}, ["16", "secrets.token_urlsafe"]),
    ({"burst": 0}, ["burst", "at least 1"]),
    ({"rate_per_s": -1.0}, ["rate must be positive"]),
    ({"tls_cert": "hub.crt"}, ["--tls-key"]),
    ({"tls_cert": "/nonexistent.crt", "tls_key": "/nonexistent.key"}, ["/nonexistent.crt", "PEM"]),
])
def test_bad_hub_settings_are_user_errors_naming_the_fix(settings, words):
    with pytest.raises(UserError) as info:
        Hub("127.0.0.1", 0, **settings)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_the_cli_refuses_all_interfaces_without_a_token_with_exit_2():
    env = {k: v for k, v in os.environ.items() if k != "RLPOST_SWARM_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "rl.cli", "swarm-hub", "--host", "0.0.0.0",
                             "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the hub started on 0.0.0.0 without a token: {out!r}")
    assert proc.returncode == 2, (out, err)
    assert "token" in err and "--token-file" in err and "RLPOST_SWARM_TOKEN" in err and "Traceback" not in err
    done = subprocess.run([sys.executable, "-m", "rl.cli", "swarm-hub", "--token-file", "/nonexistent/token"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    assert done.returncode == 2 and "/nonexistent/token" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("how", ["env", "file", "flag"])
def test_the_cli_reads_the_token_and_says_what_it_is_exposed_to(how, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RLPOST_SWARM_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    args = ["--host", "0.0.0.0", "--port", str(port), "--rate", "7", "--burst", "70"]
    if how == "env":
        env["RLPOST_SWARM_TOKEN"] = TOKEN
    elif how == "file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        args += ["--token-file", str(tmp_path / "token")]
    else:
        args += ["--token", TOKEN]
    proc = subprocess.Popen([sys.executable, "-m", "rl.cli", "swarm-hub", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert f"0.0.0.0:{port}" in line and "all interfaces" in line, line
        assert "token required" in line and "7" in line and "70" in line and "plain HTTP" in line, line
        assert "--tls-cert" in line, line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/messages", body=b'{"n": 1}', headers={"Authorization": "Bearer nope"})
        assert conn.getresponse().status == 401
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/messages", body=b'{"n": 1}', headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert ("ps" in err) == (how == "flag"), err  # --token shows in `ps`: warned


def test_serve_true_hosts_a_hub_with_the_same_token(monkeypatch, capsys):
    monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
    url = f"http://127.0.0.1:{free_port()}"
    host, peer = node(url, serve=True), node(url, serve=True)
    try:
        assert host.hub is not None and peer.hub is None
        exposure = capsys.readouterr().err
        assert "(serve: true) listening on 127.0.0.1" in exposure and "token required" in exposure, exposure
        assert request(host.hub, "POST", body=b'{"n": 0}')[0] == 401
        peer.publish([b'{"n": 1}'])
        peer.flush()
        assert host.receive() == [b'{"n": 1}'] and peer.errors == 0
    finally:
        host.close()
        peer.close()
    monkeypatch.delenv("RLPOST_SWARM_TOKEN")
    with pytest.raises(UserError, match="RLPOST_SWARM_TOKEN"):
        node(f"http://0.0.0.0:{free_port()}", serve=True)


def test_the_token_is_never_a_job_key():
    from rl.config import load_job

    with pytest.raises(UserError, match="token"):
        load_job("tiny", ["swarm={local: 1, external: 1, transport: {name: http, token: abc}}"])
    job = load_job("tiny", ["swarm={local: 1, external: 1, transport: {name: http}}"])
    assert job.swarm.transport.token_env == "RLPOST_SWARM_TOKEN" == TOKEN_ENV
    for transport, words in (("{name: http, url: 'https://hub:8765', serve: true}", ["serve", "--tls-cert"]),
                             ("{name: http, url: 'https://hub:8765', ca_file: nowhere.pem}", ["ca_file", "nowhere"]),
                             ("{name: http, token_env: 'not a name'}", ["token_env"])):
        with pytest.raises(UserError) as info:
            load_job("tiny", [f"swarm={{local: 1, external: 1, transport: {transport}}}"])
        assert all(w in str(info.value) for w in words), str(info.value)


# ----- 2. a flood cannot push honest nodes out ----------------------------------------------------
def flood_with_honest_nodes(hub, posts, honest_every, flooder_client):
    """`posts` flood messages; every `honest_every` of them, each honest node publishes one (its normal pace)."""
    a, b = node(hub.url), node(hub.url)
    sent: dict[str, list[bytes]] = {"a": [], "b": []}
    try:
        for i in range(posts):
            client, source = flooder_client(i)
            status = request(hub, "POST", body=b'{"junk": %d}' % i, token=TOKEN, client=client, source=source)[0]
            assert status in (200, 429)
            if i % honest_every == 0:
                for name, t in (("a", a), ("b", b)):
                    sent[name].append(b'{"node": "%s", "i": %d}' % (name.encode(), i))
                    t.publish([sent[name][-1]])
                    t.flush()
        assert a.errors == b.errors == 0  # honest nodes were never refused
    finally:
        a.close()
        b.close()
    return sent


@pytest.mark.parametrize("rate_per_s", [None, 50.0], ids=["eviction-alone", "default-rate-limit"])
def test_a_flood_of_10x_the_board_cannot_evict_two_honest_nodes(monkeypatch, rate_per_s):
    monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
    hub = Hub("127.0.0.1", 0, max_messages=64, token=TOKEN, rate_per_s=rate_per_s)
    try:
        sent = flood_with_honest_nodes(hub, 640, 32, lambda i: ("flooder", "127.0.0.1"))
        board = set(messages_of(hub.url))
        assert len(board) == 64 and len([m for m in board if m.startswith(b'{"junk"')]) == 64 - 40
        for name in "ab":
            assert len(sent[name]) == 20 and set(sent[name]) <= board, f"node {name}'s rollouts were evicted"
    finally:
        hub.close()


def test_a_flooder_rotating_client_ids_from_its_own_address_holds_only_its_share(monkeypatch):
    """Forged client ids do not multiply a share: the board is first shared out between addresses."""
    monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
    hub = Hub("127.0.0.1", 0, max_messages=96, token=TOKEN, rate_per_s=None)
    try:
        sent = flood_with_honest_nodes(hub, 960, 48, lambda i: (f"fake{i}", "127.0.0.2"))
        board = set(messages_of(hub.url))
        assert len([m for m in board if m.startswith(b'{"junk"')]) == 96 - 40  # the honest address's unused share
        for name in "ab":
            assert len(sent[name]) == 20 and set(sent[name]) <= board, f"node {name}'s rollouts were evicted"
    finally:
        hub.close()


def test_a_flooder_is_rate_limited_with_429_and_retry_after_and_honest_nodes_are_not(monkeypatch):
    monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
    hub = Hub("127.0.0.1", 0, token=TOKEN, rate_per_s=5.0, burst=20)
    try:
        a = node(hub.url)
        codes, retry = [], set()
        start = time.monotonic()
        for i in range(200):
            status, headers, _ = request(hub, "POST", body=b'{"junk": %d}' % i, token=TOKEN, client="flooder")
            codes.append(status)
            if status == 429:
                retry.add(headers.get("Retry-After"))
            if i % 50 == 0:
                a.publish([b'{"node": "a", "i": %d}' % i])
                a.flush()
        elapsed = time.monotonic() - start
        assert codes.count(200) <= 20 + 5 * elapsed + 1 and codes.count(429) >= 150
        assert retry and all(r is not None and int(r) >= 1 for r in retry)
        assert a.errors == 0 and len([m for m in messages_of(hub.url) if b'"a"' in m]) == 4
        a.close()
    finally:
        hub.close()


def test_a_normal_node_never_meets_the_default_rate_limit(monkeypatch):
    """A big SAPO step (64 groups at once) and 20 polls a second while waiting (node.POLL_S) for 3 s."""
    monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
    hub = Hub("127.0.0.1", 0, token=TOKEN)
    try:
        a = node(hub.url)
        a.publish([b'{"i": %d}' % i for i in range(64)])
        a.flush(timeout_s=30)
        received, end = 0, time.monotonic() + 3
        while time.monotonic() < end:
            received += len(a.receive())
            time.sleep(0.05)
        assert received == 64 and a.errors == 0
        a.close()
    finally:
        hub.close()


def test_board_at_the_default_size_keeps_honest_senders_through_a_41000_message_flood():
    board = Board()  # 4,096
    start = time.perf_counter()
    honest: dict[str, list[bytes]] = {"a": [], "b": []}
    for i in range(41_000):
        board.post(b"junk%d" % i, sender=("10.0.0.9", "flooder"))
        if i % 100 == 0:
            for name in honest:
                honest[name].append(b"%s%d" % (name.encode(), i))
                board.post(honest[name][-1], sender=("10.0.0.1", name))
    kept = set(board.since(0, limit=10_000)[1])
    assert len(kept) == 4096 and all(set(m) <= kept for m in honest.values())
    assert time.perf_counter() - start < 10


def test_memory_transports_keep_their_messages_by_fair_eviction():
    from types import SimpleNamespace

    from rl.swarm.transports import MemoryTransport, reset_memory_board

    reset_memory_board("fair")
    loud, quiet = (MemoryTransport(SimpleNamespace(board="fair")) for _ in range(2))
    loud.board.max_messages = 8
    quiet.publish([b"q"])
    loud.publish([b"x%d" % i for i in range(50)])
    assert b"q" in quiet.receive()


# ----- 3. TLS -------------------------------------------------------------------------------------
def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rlpost test hub")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "hub.crt", tmp_path / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_a_tls_hub_round_trip_with_a_self_signed_cert(tmp_path, monkeypatch):
    monkeypatch.setenv("RLPOST_SWARM_TOKEN", TOKEN)
    cert, key = self_signed(tmp_path)
    hub = Hub("127.0.0.1", 0, token=TOKEN, tls_cert=cert, tls_key=key)
    try:
        assert hub.url.startswith("https://127.0.0.1:")
        a, b = node(hub.url, ca_file=cert), node(hub.url, ca_file=cert)
        a.publish([b'{"n": 1}'])
        a.flush()
        assert b.receive() == [b'{"n": 1}'] and a.errors == b.errors == 0
        untrusting = node(hub.url)  # no CA file: the self-signed cert is not trusted, the read fails (counted)
        assert untrusting.receive() == [] and untrusting.errors == 1
        for t in (a, b, untrusting):
            t.close()
        plain = http.client.HTTPConnection("127.0.0.1", hub.server.server_address[1], timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/health")
            plain.getresponse()
    finally:
        hub.close()
