"""`swarm:` — SAPO (Swarm sAmpling Policy Optimization, arXiv 2509.08721): share decoded rollouts with
other nodes and train on I local + J external rollouts per step. null (the default) = off."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rl.config.base import Section, resolve_existing_file


class MemoryTransport(Section):
    """Nodes in one process (tests, the lock-step launcher and benchmark): a board per swarm name."""

    name: Literal["memory"] = "memory"
    board: str = "default"
    """Nodes with the same board name see each other's rollouts."""


class HttpTransport(Section):
    """Separate processes or machines: a small hub (`rl swarm-hub`, or `serve: true`) from the Python
    standard library; nodes POST their rollouts and poll for new ones."""

    name: Literal["http"] = "http"
    url: str = "http://127.0.0.1:8765"
    """The hub's address."""
    serve: bool = False
    """Start the hub inside this node (listening on the url's host and port) if none answers there."""
    timeout_s: float = Field(default=2.0, gt=0)
    """Limit on every request: a slow or dead hub costs a node at most this per step."""
    token_env: str = Field(default="RLPOST_SWARM_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable holding the hub's shared token (sent as a bearer token; also the token a
    `serve: true` hub requires). Only the variable's name belongs in the job, which is copied to the run
    directory; unset = no token, which a hub beyond loopback refuses (401)."""
    ca_file: str | None = None
    """For an https:// url: a PEM file of the certificate authority (or the self-signed certificate) the hub's
    certificate must chain to; null = the system's CAs."""

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_existing_file(value, info, "swarm.transport.ca_file")

    @model_validator(mode="after")
    def _serve_is_plain_http(self) -> HttpTransport:
        if self.serve and self.url.startswith("https:"):
            raise ValueError("swarm.transport.serve: true hosts a plain-HTTP hub, but the url is https://; run "
                             "`rl swarm-hub --tls-cert CERT --tls-key KEY` on the hub's machine and set serve: false")
        return self


class RayTransport(Section):
    """Nodes on one Ray cluster: a named (detached) exchange actor that any node creates or joins."""

    name: Literal["ray"] = "ray"
    address: str | None = None
    """An existing cluster (`auto` or host:port); null = join the one this process is in, or start one."""
    exchange: str = "rlpost-swarm"
    """Name of the exchange actor (nodes with the same name form a swarm)."""
    timeout_s: float = Field(default=2.0, gt=0)


SwarmTransportConfig = Annotated[MemoryTransport | HttpTransport | RayTransport, Field(discriminator="name")]


class SwarmConfig(Section):
    """This node's part in a SAPO swarm."""

    local: int = Field(default=4, ge=0)
    """I: local rollouts (groups = one prompt with its completions) trained on per step; at most
    rollout.prompts_per_step (all generated groups are shared, the first I are trained on)."""
    external: int = Field(default=4, ge=0)
    """J: external rollouts (groups shared by other nodes) trained on per step. When fewer are
    available the step trains on the ones there are (never waits longer than wait_s)."""
    node_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    """This node's name in the swarm; null = host name + process id."""
    transport: SwarmTransportConfig = Field(default_factory=MemoryTransport)
    share: bool = True
    """Publish this node's rollouts (false = only consume)."""
    wait_s: float = Field(default=0.0, ge=0)
    """Most seconds a step waits for J external rollouts to arrive (0 = take what is there)."""
    max_age_s: float = Field(default=600.0, gt=0)
    """External rollouts older than this (since received) are dropped (hivemind's 600 s expiry)."""
    pool_size: int = Field(default=256, ge=1)
    """Most external rollouts kept waiting to be used (oldest dropped)."""
    skip_uniform_reward: bool = False
    """Do not train on external groups whose re-scored rewards are all equal (zero advantage)."""
    max_message_bytes: int = Field(default=1_000_000, ge=1024)
    """A peer's message larger than this is rejected."""
    max_completions: int = Field(default=64, ge=1)
    """A shared rollout with more completions than this is rejected."""
    max_text_chars: int = Field(default=20_000, ge=1)
    """A question or completion longer than this is rejected."""

    @model_validator(mode="after")
    def _trains_on_something(self) -> SwarmConfig:
        if self.local + self.external == 0:
            raise ValueError("swarm.local + swarm.external must be at least 1 (rollouts trained on per step)")
        return self
