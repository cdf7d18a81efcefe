"""Fixtures of the trainer tests; builders live in trainer_testlib.py (a unique module name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trainer_testlib import build_batch

from rl.batch import RolloutBatch
from rl.config.algorithm import GRPOAdvantage
from trainers.advantages import grpo


@pytest.fixture
def uneven_batch() -> RolloutBatch:
    """8 rows, 2 groups of 4, uneven prompt and completion lengths, with GRPO-like advantages."""
    batch = build_batch([3, 5, 4, 2, 6, 3, 4, 5], [4, 1, 6, 3, 2, 5, 7, 3], group_size=4,
                        rewards=[1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.25])
    return batch.with_advantages(grpo(batch.rewards, batch.group_ids, GRPOAdvantage()))
