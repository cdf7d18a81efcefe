"""The swarm's wire format: one shared rollout = one question + its group of decoded completions.

SAPO shares rollouts as decoded text so that nodes with different models, tokenizers and chat
templates can use each other's experience (arXiv 2509.08721 §3; gensyn-ai/rl-swarm shares a question
with its `num_generations` completion strings and ground-truth answer as one "tree").

A message is UTF-8 JSON (no NaN/Infinity), one rollout per message:

    {"format": "rlpost-sapo/1", "node_id": "node0", "rollout_id": "node0-17-3", "round": 17,
     "question": "What is 3 + 4? ...",          # the user message, not the sender's rendered template
     "completions": ["7", "8"], "finish_reasons": ["stop", "stop"],
     "rewards": [1.0, 0.0],                      # the sender's claim: reported, never trained on
     "meta": {"answer": "7"},                    # env fields the receiver's rewards read
     "model": "smollm2-135m-instruct", "sent_at": 1763850000.0}
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from rl.batch import RolloutBatch

FORMAT = "rlpost-sapo/1"
MAX_META_ITEMS = 32  # items of a list-valued meta field (e.g. countdown's numbers)


@dataclass(frozen=True)
class SharedRollout:
    node_id: str
    rollout_id: str
    round: int
    question: str
    completions: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    rewards: tuple[float, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    model: str = ""
    sent_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "completions", tuple(self.completions))
        object.__setattr__(self, "finish_reasons", tuple(self.finish_reasons))
        object.__setattr__(self, "rewards", tuple(float(r) for r in self.rewards))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def key(self) -> tuple[str, str]:
        """Identity for de-duplication."""
        return self.node_id, self.rollout_id

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "node_id": self.node_id, "rollout_id": self.rollout_id, "round": self.round,
                "question": self.question, "completions": list(self.completions),
                "finish_reasons": list(self.finish_reasons), "rewards": list(self.rewards),
                "meta": dict(self.meta), "model": self.model, "sent_at": self.sent_at}

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()


def json_safe(value: object) -> bool:
    """A meta value a peer can carry: a finite scalar, or a short list of them."""
    if isinstance(value, (list, tuple)):
        return len(value) <= MAX_META_ITEMS and all(json_safe(v) and not isinstance(v, (list, tuple)) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, bool, int))


def rollouts_from_batch(batch: RolloutBatch, node_id: str, round_: int,
                        model: str = "") -> tuple[list[SharedRollout], int]:
    """One `SharedRollout` per group of a scored batch; (rollouts, groups that cannot be shared).

    A group can be shared only if its prompt carries its user message (`meta["question"]`, which every
    env rendered through `envs.base.render_prompt` has): the receiver re-renders it with its own chat
    template. Meta fields that are not JSON scalars (or short lists of them) are left out.
    """
    rewards = batch.rewards.tolist() if batch.rewards is not None else None
    out, unshareable, now = [], 0, time.time()
    for g, (start, end) in enumerate(batch.group_bounds()):
        meta = batch.sample_meta[start]
        question = meta.get("question")
        group_rewards = rewards[start:end] if rewards is not None else []
        if not isinstance(question, str) or not all(math.isfinite(r) for r in group_rewards):
            unshareable += 1
            continue
        out.append(SharedRollout(
            node_id=node_id, rollout_id=f"{node_id}-{round_}-{g}", round=round_, question=question,
            completions=batch.completion_texts[start:end], finish_reasons=batch.finish_reasons[start:end],
            rewards=tuple(group_rewards or [0.0] * (end - start)), model=model, sent_at=now,
            meta={k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.items()
                  if k != "question" and json_safe(v)}))
    return out, unshareable
