"""Running user reward functions (trusted code) in a worker process, with a per-call time limit and guards.

Reward functions are the user's own code, trusted like the rest of the job; what runs model-written code
is rl/sandbox.py (an OS sandbox). What an isolated reward gets, to contain mistakes, not attacks:
- its own spawned process (no state shared with the trainer); a call that exceeds `timeout_s` has the
  worker killed and replaced, and a worker that dies (crash, memory limit) is replaced on the next call;
- a fresh empty working directory (also its TMPDIR), deleted when the worker is replaced or closed;
- OS limits: address space (`memory_mb`) and size of any file it writes;
- a second line, `trusted_code_guard`: a Python audit hook that refuses creating or connecting sockets and
  DNS lookups; opening a file for writing, and removing/renaming/creating/chmod-ing paths, outside that
  directory; starting processes. It catches a reward that does so by mistake. It is NOT a security
  boundary (Python's documentation says so: ctypes or a C extension never raise its events): never let a
  reward function execute model output itself; use `code_exec`/rl.sandbox for that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from rewards.calling import Outcome, call_reward
from rewards.guard import trusted_code_guard

PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
FILE_SIZE_LIMIT_BYTES = 64 << 20
STARTUP_GRACE_S = 20.0  # for spawning the worker and importing the user's module (not counted in timeout_s)
_FN: Callable[..., object] | None = None


def _init_worker(name: str | None, import_path: str | None, root: str, memory_mb: int) -> None:
    import resource

    global _FN
    sys.dont_write_bytecode = True
    from rewards.loading import load_function

    _FN = load_function(name, import_path)  # before the limits: importing may legitimately need more
    os.chdir(root)
    os.environ["TMPDIR"] = root
    tempfile.tempdir = root
    memory = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    sys.addaudithook(trusted_code_guard(root))


def _run(prompts: Sequence[str], completions: Sequence[str], fields: Sequence[Mapping[str, object]],
         kwargs: Mapping[str, object]) -> list[Outcome]:
    assert _FN is not None
    return call_reward(_FN, prompts, completions, fields, kwargs)


@contextlib.contextmanager
def _project_first_on_path() -> Iterator[None]:
    """A spawned worker starts with the parent's sys.path; put this project first while it starts, so a
    same-named directory earlier on the path (a `rewards/` folder of tests or of the user's) cannot
    shadow the package through the editable-install finder."""
    sys.path.insert(0, PROJECT_ROOT)
    try:
        yield
    finally:
        sys.path.remove(PROJECT_ROOT)


class IsolatedReward:
    """One reward in its own sandboxed worker process.

    `__call__(prompts, completions, fields)` gives one outcome per sample. A plain function is called once
    per sample, each call with its own `timeout_s`; a `@batched_reward` function once per batch.
    """

    def __init__(self, name: str | None, import_path: str | None, kwargs: Mapping[str, object], timeout_s: float,
                 batched: bool, memory_mb: int = 4096) -> None:
        self._source = (name, import_path)
        self.kwargs, self.timeout_s, self.batched, self.memory_mb = dict(kwargs), timeout_s, batched, memory_mb
        self._pool: ProcessPoolExecutor | None = None
        self._root: str | None = None
        self._last_error: Outcome = ("error", "")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 fields: Sequence[Mapping[str, object]]) -> list[Outcome]:
        if self.batched:
            return self._submit(prompts, completions, fields) or [self._last_error] * len(prompts)
        out = []
        for p, c, f in zip(prompts, completions, fields):
            got = self._submit([p], [c], [f])
            out.append(got[0] if got else self._last_error)
        return out

    def _submit(self, prompts: Sequence[str], completions: Sequence[str],
                fields: Sequence[Mapping[str, object]]) -> list[Outcome] | None:
        """The worker's outcomes, or None with `_last_error` set when the call itself failed."""
        try:
            future = self._ensure().submit(_run, list(prompts), list(completions), [dict(f) for f in fields],
                                           self.kwargs)
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            cause = f"timed out after {self.timeout_s:g}s (worker killed and replaced)"
        except BrokenProcessPool:
            cause = "the reward worker process died (crash, os._exit or memory limit); replaced"
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable return value: reported, not raised
            cause = f"{type(exc).__name__}: {exc}"
        self.close()
        self._last_error = ("error", cause)
        return None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._root = tempfile.mkdtemp(prefix="rlpost-reward-")
            self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_init_worker,
                                             initargs=(*self._source, self._root, self.memory_mb))
            with _project_first_on_path():
                self._pool.submit(int).result(timeout=STARTUP_GRACE_S)  # start it now, with that path
        return self._pool

    def close(self) -> None:
        """Kill the worker (a hung call never returns by itself) and delete its sandbox directory."""
        if self._pool is not None:
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                proc.kill()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
