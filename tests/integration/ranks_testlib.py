"""Running a function on N real learner ranks (spawned processes, gloo), for the multi-rank tests."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from rl.loop.distributed import free_port, join_group, leave_group


def _rank(fn: Callable[..., object], rank: int, size: int, port: int, out: str, args: tuple) -> None:
    try:
        torch.set_num_threads(1)
        join_group(rank, size, "127.0.0.1", port, "cpu", timeout_s=120)
        result = fn(rank, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        leave_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(fn: Callable[..., object], size: int, out: Path, *args: object, timeout_s: float = 300) -> list:
    """`fn(rank, *args)` on `size` ranks of one gloo group (a module-level function: spawn pickles it by
    name); the ranks' results in rank order. A rank's traceback fails the caller."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(fn, r, size, port, str(out), args)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(out.glob("rank*.err"))]
    assert not errors and all(p.exitcode == 0 for p in procs), "\n".join(errors) or [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]
