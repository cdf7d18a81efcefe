"""A node's side of SAPO, called once per step by the driver between scoring and advantages:

    batch, metrics = swarm.exchange(parts, scored_local_batch, step)
      1. publish: every generated group (decoded text + the sender's rewards) goes to the swarm;
      2. collect: read what peers sent; reject and count malformed/oversized/duplicated/non-finite ones;
      3. mix: the first I local groups + J external groups drawn uniformly from the fresh ones, each
         external group re-tokenised and re-scored by this node's own rewards; fewer available ->
         fewer used (never waits longer than wait_s);
      4. external rows get this learner's own logprobs as their sampling logprobs: the old policy is
         the current one, ratio 1 and mismatch weight 1 (genrl treats shared text as on-policy:
         `old_per_token_logps = None`, ALGORITHMS.md §9.2); the sender's logprobs never travel.

Advantages are then computed per group (a group never mixes local and external completions: whole
"trees" are shared, as rl-swarm does). The sender's claimed rewards are ignored for training and
only reported (`swarm/claimed_reward_gap`).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.swarm import mixing
from rl.swarm.exchange import rollouts_from_batch
from rl.swarm.pool import ExternalPool
from rl.swarm.transports import Transport, build_transport
from rl.swarm.validation import REASONS, Limits, Rejected, parse_message

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.loop.runtime import RunParts  # the loop calls this stage with its parts; no import at run time

POLL_S = 0.05


class NoSwarm:
    """`swarm: null`: the step trains on its own batch, unchanged."""

    def exchange(self, parts: RunParts, batch: RolloutBatch, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        return batch, {}

    def close(self) -> None:
        pass


def build_swarm(job: JobConfig, transport: Transport | None = None) -> NoSwarm | SwarmNode:
    return NoSwarm() if job.swarm is None else SwarmNode(job, transport)


class SwarmNode:
    def __init__(self, job: JobConfig, transport: Transport | None = None) -> None:
        if job.swarm is None:
            raise ValueError("SwarmNode needs the job's swarm section (build_swarm returns NoSwarm without one)")
        self.job, self.cfg = job, job.swarm
        self.node_id = self.cfg.node_id or f"{socket.gethostname()}-{os.getpid()}"[:64].replace(" ", "_")
        self.transport = transport or build_transport(self.cfg.transport, self.cfg.max_message_bytes)
        self.pool = ExternalPool(self.cfg.pool_size, self.cfg.max_age_s)
        self.limits = Limits.of(self.cfg)
        self.rejected: Counter[str] = Counter()
        self.published = self.received = 0
        self.peer_seen: dict[str, float] = {}  # node id -> when its last valid rollout arrived

    # ----- 1. publish ------------------------------------------------------------------------
    def publish(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        if not self.cfg.share:
            return {"swarm/published": 0.0}
        rollouts, unshareable = rollouts_from_batch(batch, self.node_id, step, self.job.model.path)
        messages = [r.encode() for r in rollouts]
        messages = [m for m in messages if len(m) <= self.cfg.max_message_bytes]  # peers would reject them
        self.transport.publish(messages)
        self.published += len(messages)
        return {"swarm/published": float(len(messages)), "swarm/unshareable": float(len(rollouts) - len(messages)
                                                                                     + unshareable)}

    # ----- 2. collect ------------------------------------------------------------------------
    def collect(self) -> int:
        """Validate what arrived into the pool; returns how many new valid rollouts were added."""
        added = 0
        for message in self.transport.receive():
            try:
                rollout = parse_message(message, self.limits)
                if rollout.node_id == self.node_id:
                    continue  # our own messages come back through the board
                self.pool.add(rollout)
                self.peer_seen[rollout.node_id] = time.monotonic()
                added += 1
            except Rejected as exc:
                self.rejected[exc.reason] += 1
        self.received += added
        return added

    def _wait_for(self, count: int) -> None:
        deadline = time.monotonic() + self.cfg.wait_s
        self.collect()
        while len(self.pool) < count and time.monotonic() < deadline:
            time.sleep(POLL_S)
            self.collect()

    # ----- 3 + 4. mix ------------------------------------------------------------------------
    def mix(self, parts: RunParts, batch: RolloutBatch, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        start = time.perf_counter()
        local = mixing.first_groups(batch, self.cfg.local)
        self._wait_for(self.cfg.external)
        external, stats = self._external(parts, batch.policy_version, step)
        mixed = mixing.mix([local, external], ext_pad(parts))
        if mixed is None:  # local: 0 and no peer rollouts: train on one own group rather than on nothing
            local = mixed = mixing.first_groups(batch, 1)
            stats["swarm/fallback_local"] = 1.0
        if mixed is None:  # scoring dropped every group: an empty step, as without a swarm (train skips it)
            mixed = batch
        metrics = {"swarm/local": float(local.num_groups if local is not None else 0),
                   "swarm/external": float(external.num_groups if external is not None else 0),
                   "swarm/local_samples": float(local.num_samples if local is not None else 0),
                   "swarm/external_samples": float(external.num_samples if external is not None else 0),
                   "swarm/received": float(self.received), "swarm/pool": float(len(self.pool)),
                   "swarm/peers": float(self.peers()), "swarm/rejected": float(sum(self.rejected.values())),
                   "swarm/transport_errors": float(self.transport.errors), **stats}
        metrics.update({f"swarm/rejected/{r}": float(self.rejected[r]) for r in REASONS if self.rejected[r]})
        metrics["swarm/external_shortfall"] = self.cfg.external - metrics["swarm/external"]
        metrics["time/swarm_s"] = time.perf_counter() - start
        return mixed, metrics

    def _external(self, parts: RunParts, version: int, step: int) -> tuple[RolloutBatch | None, dict[str, float]]:
        """Up to J re-tokenised, re-scored external groups with this learner's logprobs."""
        rng = random.Random(f"{self.job.seed}:{self.node_id}:{step}")
        kept: list[RolloutBatch] = []
        claimed: list[float] = []
        skipped = 0
        while sum(b.num_groups for b in kept) < self.cfg.external and len(self.pool):
            chosen = self.pool.take(self.cfg.external - sum(b.num_groups for b in kept), rng)
            ext, too_long = mixing.external_batch(chosen, parts.tokenizer, self.job.rollout.max_new_tokens,
                                                  self.job.rollout.max_prompt_tokens, version)
            self.rejected["too_long"] += too_long
            if ext is None:
                continue
            ext = self._rescore(parts, ext)
            if ext is not None and self.cfg.skip_uniform_reward:
                uniform = mixing.uniform_groups(ext)
                skipped += len(uniform)
                ext = mixing.drop_groups(ext, uniform)
            if ext is not None:
                kept.append(ext)
                claimed += [x for r in chosen for x in r.rewards]  # aligned with ext unless rows were dropped
        if not kept:
            return None, {"swarm/skipped_uniform": float(skipped)}
        ext = kept[0] if len(kept) == 1 else RolloutBatch.concat(kept, pad_token_id=ext_pad(parts))
        ext = ext.replace(sampling_logprobs=parts.learner.logprobs(ext) * ext.loss_mask)
        rewards = ext.rewards
        assert rewards is not None, "kept batches are rescored"
        stats = {"swarm/external_reward_mean": float(rewards.mean()), "swarm/skipped_uniform": float(skipped)}
        if len(claimed) == ext.num_samples:
            stats["swarm/claimed_reward_gap"] = float((torch.tensor(claimed) - rewards).abs().mean())
        return ext, stats

    def _rescore(self, parts: RunParts, ext: RolloutBatch) -> RolloutBatch | None:
        """This node's own reward functions (and weights, shaping) decide the reward; the sender's claim does not."""
        result = parts.scorer.score(ext)
        scored = ext.with_rewards(result.total, result.components)
        if bool(result.keep.all()):
            return scored
        rows = torch.nonzero(result.keep).flatten()
        return scored.select(rows) if len(rows) else None

    def peers(self) -> int:
        """Peers whose rollouts arrived within max_age_s (live members of the swarm, as seen from here)."""
        recent = time.monotonic() - self.cfg.max_age_s
        return sum(t >= recent for t in self.peer_seen.values())

    # ----- the driver's entry point -------------------------------------------------------------
    def exchange(self, parts: RunParts, batch: RolloutBatch, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        published = self.publish(batch, step)
        mixed, metrics = self.mix(parts, batch, step)
        return mixed, {**published, **metrics}

    def close(self) -> None:
        self.transport.close()


def ext_pad(parts: RunParts) -> int:
    tok = parts.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
