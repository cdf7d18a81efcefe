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
