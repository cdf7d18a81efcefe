"""External rollouts waiting to be trained on: de-duplicated, bounded, expiring, each used once."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable

from rl.swarm.exchange import SharedRollout
from rl.swarm.validation import Rejected

SEEN_KEYS = 100_000  # remembered (node, rollout) keys for duplicate detection


class ExternalPool:
    """Valid peer rollouts, newest last. `add` raises Rejected("duplicate") for a key seen before
    (a replayed or re-sent message). `take(k, rng)` prefers fresh rollouts, those that arrived since
    the previous `take` (in lock-step: this round's, as rl-swarm reads the DHT key of the current
    round): k drawn uniformly from them, topped up with the newest older ones when fewer arrived."""

    def __init__(self, size: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.max_age_s, self.clock = size, max_age_s, clock
        self._items: OrderedDict[tuple[str, str], tuple[float, int, SharedRollout]] = OrderedDict()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.dropped = 0  # expired or pushed out before being used
        self._arrivals = 0
        self._fresh_from = 0  # arrival index of the first rollout not yet offered to a `take`

    def add(self, rollout: SharedRollout) -> None:
        if rollout.key in self._seen:
            raise Rejected("duplicate", "/".join(rollout.key))
        self._seen[rollout.key] = None
        if len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        self._items[rollout.key] = (self.clock(), self._arrivals, rollout)
        self._arrivals += 1
        while len(self._items) > self.size:
            self._items.popitem(last=False)
            self.dropped += 1

    def expire(self) -> None:
        limit = self.clock() - self.max_age_s
        for key in [k for k, (t, _, _) in self._items.items() if t < limit]:
            del self._items[key]
            self.dropped += 1

    def take(self, count: int, rng: random.Random) -> list[SharedRollout]:
        self.expire()
        fresh = [k for k, (_, a, _) in self._items.items() if a >= self._fresh_from]
        fresh_set = set(fresh)
        older = [k for k in self._items if k not in fresh_set]
        self._fresh_from = self._arrivals
        chosen = rng.sample(fresh, min(count, len(fresh)))
        chosen += older[::-1][: count - len(chosen)]
        return [self._items.pop(k)[2] for k in chosen]

    def __len__(self) -> int:
        return len(self._items)
