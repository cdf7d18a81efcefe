"""Guarding a port rlpost opens: a shared bearer token, per-client rate limits, TLS, and a start-up line saying
what the port is exposed to. The swarm hub (rl/swarm/hub.py) uses it; any other HTTP server rlpost opens (e.g. an
OpenAI-compatible endpoint) should use the same pieces: `Access` + `Guard.check` per request, `require_token`
before binding, `exposure_line` at start-up, `server_tls`/`client_tls` for TLS. Standard library only.

Who is a client. The peer address alone is not enough: every node on one machine, or behind one NAT or reverse
proxy, shares it. A client therefore is (peer address, declared client id): the id comes from the
`X-Rlpost-Client` header, which any token holder can forge. Limits are kept at both levels so that forging does
not multiply a sender's share: each client has a token bucket (`rate_per_s`, `burst`), and each address has one
`clients_per_ip` times larger (0 = none: behind a reverse proxy every client shares the proxy's address). The
swarm board evicts the same way (rl/swarm/hub.py: from the address, then the client, holding the most).

What a token does not stop: the token is for trusted nodes. A token holder can post well-formed junk at its rate
limit (receivers validate and re-score everything, rl/swarm/validation.py), read every message, claim another
node's id in message bodies, and, from many addresses, hold a share of the board per address. A request without
the token can only cost the hub a 401 (and counts against its address's bucket). Without TLS the token and the
rollouts cross the network in plain text.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from rl.errors import UserError

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

CLIENT_HEADER = "X-Rlpost-Client"
CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
ALL_INTERFACES = ("", "0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only (a host name may resolve anywhere: not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"the shared token is {len(token)} characters long; use at least {MIN_TOKEN_CHARS} random "
                        f"ones, e.g. from `{MAKE_TOKEN}`.")
    return token


def require_token(host: str, token: str | None, what: str, fix: str) -> None:
    """Refuse to open `what` beyond loopback without a token (`fix` says how to give one)."""
    if token is None and not is_loopback(host):
        raise UserError(f"{what} would listen on {host or 'all interfaces'}, beyond this machine, without a shared "
                        f"token, so anyone who can reach the port could use it. {fix}; make a token with "
                        f"`{MAKE_TOKEN}`. Or listen on 127.0.0.1.")


def read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read the token file {path}: {exc.strerror}; give a readable file holding the "
                        "token on one line.") from None
    if not token:
        raise UserError(f"the token file {path} is empty; put the shared token in it on one line.")
    return token


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (compared in constant time)."""
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def client_id(header: str | None) -> str:
    """The declared client id, or "-" when missing or malformed."""
    return header if header is not None and CLIENT_ID.match(header) else "-"


class RateLimiter:
    """Token buckets by key: `rate_per_s` refill, `burst` capacity; `take` returns 0 or the seconds to wait."""

    MAX_KEYS = 65_536  # beyond this, full buckets (equal to a fresh one) are forgotten

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s, self.burst, self.clock = rate_per_s, burst, clock
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: object) -> float:
        with self._lock:
            now = self.clock()
            tokens, when = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate_per_s)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate_per_s
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            if len(self._buckets) > self.MAX_KEYS:
                self._forget_full(now)
            return wait

    def _forget_full(self, now: float) -> None:
        self._buckets = {k: (t, w) for k, (t, w) in self._buckets.items()
                         if t + (now - w) * self.rate_per_s < self.burst}


@dataclass(frozen=True)
class Access:
    """Who may use a port and how fast: `token` None = anyone (loopback only); `rate_per_s` None = no limit."""

    token: str | None = None
    rate_per_s: float | None = 50.0  # a SAPO node posts a few messages a step and polls at most 20 times a second
    burst: int = 500
    clients_per_ip: int = 16

    def __post_init__(self) -> None:
        check_token(self.token)
        if (self.rate_per_s is not None and self.rate_per_s <= 0) or self.burst < 1 or self.clients_per_ip < 0:
            raise UserError(f"rate limit {self.rate_per_s}/s, burst {self.burst}, {self.clients_per_ip} clients per "
                            "address: the rate must be positive (or off), the burst at least 1 request and the "
                            "clients per address at least 0 (0 = no per-address limit).")

    def describe(self) -> str:
        auth = "token required" if self.token else "NO token (anyone who can reach the port may use it)"
        if self.rate_per_s is None:
            return f"{auth}, no rate limit"
        per_ip = f", {self.clients_per_ip}x that per address" if self.clients_per_ip else ""
        return f"{auth}, rate limit {self.rate_per_s:g}/s burst {self.burst} per client{per_ip}"


class Verdict(NamedTuple):
    status: int  # 200 = go on, 401 = no or wrong token, 429 = over the rate limit
    retry_after_s: int = 0


class Guard:
    """One decision per request, before its body is read: the address's bucket, the token, the client's bucket."""

    def __init__(self, access: Access, clock: Callable[[], float] = time.monotonic) -> None:
        self.access = access
        rate, burst, per_ip = access.rate_per_s, access.burst, access.clients_per_ip
        self._clients = RateLimiter(rate, burst, clock) if rate else None
        self._addresses = RateLimiter(rate * per_ip, burst * per_ip, clock) if rate and per_ip else None

    def check(self, authorization: str | None, address: str, client: str) -> Verdict:
        if self._addresses is not None and (wait := self._addresses.take(address)):
            return Verdict(429, math.ceil(wait))
        if self.access.token is not None and not bearer_ok(authorization, self.access.token):
            return Verdict(401)
        if self._clients is not None and (wait := self._clients.take((address, client))):
            return Verdict(429, math.ceil(wait))
        return Verdict(200)


def exposure_line(host: str, port: int, access: Access, tls: bool) -> str:
    """What a listening port is exposed to, in one line for its start-up output."""
    if is_loopback(host):
        where, plain = "loopback: this machine only", "plain HTTP"
    else:
        where = "all interfaces" if host in ALL_INTERFACES else "a network interface"
        plain = "plain HTTP (token and data readable on the network): put it behind a TLS reverse proxy or pass " \
                "--tls-cert/--tls-key"
    return f"listening on {host}:{port} ({where}): {access.describe()}, {'TLS' if tls else plain}"


def server_tls(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """A server-side TLS context from a PEM certificate (chain) and its private key; None without either."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        raise UserError("TLS needs both a certificate and its private key (--tls-cert and --tls-key); give both, "
                        "or neither for plain HTTP.")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the TLS certificate {cert_file} with key {key_file}: {exc}; give a PEM "
                        "certificate and its matching PEM private key.") from None
    return context


def client_tls(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only `ca_file` (e.g. a self-signed hub's certificate)."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the CA file {ca_file}: {exc}; give a PEM file with the hub's certificate "
                        "or its CA.") from None


def send_json(handler: BaseHTTPRequestHandler, code: int, body: Mapping[str, object],
              headers: Mapping[str, str] | None = None) -> None:
    """Answer a request with a JSON body (the hub's and the chat endpoint's one reply shape)."""
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
