"""What every benchmark shares: one JSON object on stdout and, with --out, in a file, stamped with where it came
from (command, commit, machine, date), and the statistics its ratios are reported with (median and range over
repeats run in alternating arm order)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """This checkout's commit, with `+dirty` when tracked files differ from it (the figures may not be its)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, Any]:
    """CPU model, cores this process may use, memory and Python: what a reader needs to compare two files."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "mem_mib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())}


def provenance() -> dict[str, Any]:
    """command (as typed, `python -m` module included), commit, machine and date of this run."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    argv = ["python", "-m", spec.name, *sys.argv[1:]] if spec is not None else [sys.executable, *sys.argv]
    return {"command": " ".join(argv), "commit": git_commit(), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def emit(result: dict[str, Any], out: str | None, indent: int | None = 1) -> None:
    """Print `result` with its provenance as JSON; with `out`, also write it there (parent folders made)."""
    text = json.dumps({**result, "provenance": provenance()}, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median and range of per-repeat values (a ratio quoted in README is the median of >= 3 with its range)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def abba(arms: Sequence[str], repeats: int) -> list[str]:
    """Run order of `repeats` rounds of `arms` alternating direction (A B, B A, A B, ...): a slow drift of the
    machine's speed then falls on every arm alike."""
    return [arm for i in range(repeats) for arm in (arms if i % 2 == 0 else list(reversed(arms)))]


def self_command(spec_name: str, *args: str) -> list[str]:
    """The command that re-runs benchmark module `spec_name` (`python -m`, from the repository root) with `args`."""
    return [sys.executable, "-m", spec_name, *args]


def child_env() -> dict[str, str]:
    """Environment for a child process: this checkout's packages first, whatever else is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")] if p)}
