"""Running user reward functions in a worker process, with a per-call time limit and a sandbox.

The worker (spawned, so it shares no state with the trainer) starts in a fresh empty directory,
with address-space and file-size limits, and with a Python audit hook that refuses network
connections and file writes outside that directory. A call that exceeds `timeout_s` has its worker
killed and replaced. This contains mistakes and misbehaving rewards; it is not a security boundary
against deliberately hostile code (use `code_exec`, which runs code in a separate interpreter with
OS limits, or a container for that).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Callable, Mapping, Sequence

MEMORY_LIMIT_BYTES = 4 << 30
FILE_SIZE_LIMIT_BYTES = 64 << 20
BLOCKED_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo")
WRITE_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate")

_FN: Callable[..., Any] | None = None


def call_reward(fn: Callable[..., Any], prompts: Sequence[str], completions: Sequence[str],
                fields: Sequence[Mapping[str, Any]], kwargs: Mapping[str, Any]) -> list[Any]:
    """Raw results of `fn` for each sample (batched and async functions handled)."""
    if getattr(fn, "batched", False):
        columns = {k: [f.get(k) for f in fields] for k in (fields[0] if fields else {})}
        result = fn(list(prompts), list(completions), **columns, **kwargs)
        result = asyncio.run(result) if inspect.isawaitable(result) else result
        return list(result)
    out = []
    for p, c, f in zip(prompts, completions, fields):
        value = fn(p, c, **{**f, **kwargs})
        out.append(asyncio.run(value) if inspect.isawaitable(value) else value)
    return out


def _sandbox(root: str) -> None:
    import resource

    for limit, value in ((resource.RLIMIT_AS, MEMORY_LIMIT_BYTES), (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES)):
        resource.setrlimit(limit, (value, value))
    root = os.path.realpath(root)

    def inside(path: Any) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and \
            os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"reward sandbox: network access is not allowed ({event})")
        if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(m in args[1] for m in "wax+"):
            if not inside(args[0]):
                raise PermissionError(f"reward sandbox: writing {args[0]!r} is not allowed (only inside {root})")
        if event in WRITE_EVENTS and args and not inside(args[0]):
            raise PermissionError(f"reward sandbox: {event} on {args[0]!r} is not allowed")

    sys.addaudithook(hook)


def _init_worker(name: str | None, import_path: str | None) -> None:
    global _FN
    sys.dont_write_bytecode = True
    from rewards.loading import load_function

    _FN = load_function(name, import_path)
    root = tempfile.mkdtemp(prefix="rlpost-reward-")
    os.chdir(root)
    _sandbox(root)


def _run_one(prompt: str, completion: str, fields: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", call_reward(_FN, [prompt], [completion], [fields], kwargs)[0]
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported back, not raised here
        return "error", f"{type(exc).__name__}: {exc}"


class IsolatedReward:
    """One user reward in its own worker process; `__call__` returns ("ok", value) or ("error", cause)."""

    def __init__(self, name: str | None, import_path: str | None, kwargs: Mapping[str, Any], timeout_s: float) -> None:
        self._init = (name, import_path)
        self.kwargs, self.timeout_s = dict(kwargs), timeout_s
        self._pool: ProcessPoolExecutor | None = None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_init_worker,
                                             initargs=self._init)
        return self._pool

    def __call__(self, prompt: str, completion: str, fields: Mapping[str, Any]) -> tuple[str, Any]:
        future = self._ensure().submit(_run_one, prompt, completion, dict(fields), self.kwargs)
        try:
            return future.result(timeout=self.timeout_s + 10 if self._fresh() else self.timeout_s)
        except FutureTimeout:
            self.close()
            return "error", f"timed out after {self.timeout_s:g}s (worker killed)"
        except BrokenProcessPool:
            self.close()
            return "error", "the reward worker process died (crash or memory limit)"

    def _fresh(self) -> bool:
        # The first call also pays for starting the worker and importing the user's module.
        fresh = not getattr(self, "_warm", False)
        self._warm = True
        return fresh

    def close(self) -> None:
        if self._pool is None:
            return
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            proc.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._warm = False
