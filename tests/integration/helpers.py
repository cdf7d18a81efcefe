"""Running the real `rl` CLI in a subprocess, and reading what a run wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RL = [sys.executable, "-m", "rl.cli"]
VOLATILE = ("time/", "rollout/tokens_per_s", "train/tokens_per_s", "tokens_per_s")


def rl(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*RL, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def stable(rows: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures, for comparing two runs."""
    return [{k: v for k, v in row.items() if not any(k.startswith(p) or p in k for p in VOLATILE)} for row in rows]


def checkpoint_weights(checkpoint: Path) -> dict:
    """The policy weights a (sharded) checkpoint holds, read on one process as `rl eval`/`rl export` do."""
    from rl.loop.standalone import learner_from_checkpoint

    return {k: v.detach().clone() for k, v in learner_from_checkpoint(str(checkpoint)).model.state_dict().items()}
