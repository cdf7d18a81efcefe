"""Peer messages are untrusted input: parse strictly, bound every size, reject and count what is wrong.

`parse_message(data, limits)` returns a `SharedRollout` or raises `Rejected(reason)`; the reason is
one of REASONS and becomes the metric `swarm/rejected/<reason>`. Duplicates are caught by the pool
(rl/swarm/pool.py), which remembers the keys it has seen.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rl.batch import FINISH_REASONS
from rl.swarm.exchange import FORMAT, MAX_META_ITEMS, SharedRollout, json_safe

if TYPE_CHECKING:
    from rl.config.swarm import SwarmConfig

REASONS = ("oversized", "malformed", "schema", "nonfinite", "too_long", "duplicate", "expired")
FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "node_id": str, "rollout_id": str, "round": int, "question": str, "completions": list,
    "finish_reasons": list, "rewards": list, "meta": dict, "model": str, "sent_at": (int, float)}
ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 1_000_000
    max_completions: int = 64
    max_text_chars: int = 20_000

    @classmethod
    def of(cls, swarm_cfg: SwarmConfig) -> Limits:
        return cls(swarm_cfg.max_message_bytes, swarm_cfg.max_completions, swarm_cfg.max_text_chars)


def _no_constants(name: str) -> float:
    raise Rejected("nonfinite", f"{name} in a message")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999
        raise Rejected("nonfinite", text[:32])
    return value


def parse_message(data: bytes, limits: Limits) -> SharedRollout:
    """Decode and check one peer message (see rl/swarm/exchange.py for the format)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > limits.max_message_bytes:
        raise Rejected("oversized", f"{len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constants, parse_float=_finite_float)
    except Rejected:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected("malformed", str(exc)[:80]) from None
    return _check(obj, limits)


def _check(obj: object, limits: Limits) -> SharedRollout:
    if not isinstance(obj, dict) or set(obj) != set(FIELDS):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise Rejected("schema", f"keys {keys}")
    for key, kind in FIELDS.items():
        if not isinstance(obj[key], kind) or (isinstance(obj[key], bool) and kind is not bool):
            raise Rejected("schema", f"{key} must be {kind}")
    if obj["format"] != FORMAT or not ID.match(obj["node_id"]) or not ID.match(obj["rollout_id"]) or obj["round"] < 0:
        raise Rejected("schema", "format, node_id, rollout_id or round")
    n = len(obj["completions"])
    if not 1 <= n <= limits.max_completions or len(obj["finish_reasons"]) != n or len(obj["rewards"]) != n:
        raise Rejected("schema", f"{n} completions, {len(obj['finish_reasons'])} finish reasons, "
                                 f"{len(obj['rewards'])} rewards")
    texts = [obj["question"], obj["model"], *obj["completions"]]
    if not all(isinstance(t, str) for t in texts) or not obj["question"].strip():
        raise Rejected("schema", "question and completions must be strings")
    if max(len(t) for t in texts) > limits.max_text_chars:
        raise Rejected("too_long", f"a text of {max(len(t) for t in texts)} chars")
    if not all(r in FINISH_REASONS for r in obj["finish_reasons"]):
        raise Rejected("schema", "finish_reasons")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in obj["rewards"]):
        raise Rejected("schema", "rewards must be numbers")
    if not all(math.isfinite(float(r)) for r in obj["rewards"]) or not math.isfinite(float(obj["sent_at"])):
        raise Rejected("nonfinite", "rewards or sent_at")
    _check_meta(obj["meta"], limits)
    return SharedRollout(**{k: v for k, v in obj.items() if k != "format"})


def _check_meta(meta: Mapping[str, object], limits: Limits) -> None:
    if len(meta) > MAX_META_ITEMS or not all(isinstance(k, str) and len(k) <= 64 for k in meta):
        raise Rejected("schema", "meta keys")
    if "question" in meta:
        raise Rejected("schema", "meta must not override question")
    for key, value in meta.items():
        if not json_safe(value):
            raise Rejected("schema", f"meta[{key!r}] must be a scalar or a short list of scalars")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and len(v) > limits.max_text_chars for v in items):
            raise Rejected("too_long", f"meta[{key!r}]")
