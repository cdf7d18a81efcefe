"""Suite-wide settings: offline hub; in CI (env CI set) nothing may skip but a `gpu` test; a real small tmpfs.

CI must show 0 skipped: a test that needs vLLM, Ray, SmolLM2 or root (a tmpfs) and skips there means CI did not
test it. So under CI a skip is a failure, whether it happens inside a test, in its setup (skipif, a fixture) or at
collection time (a module-level `importorskip`, where the module's markers are not even known). CI is CPU-only,
so `gpu` tests are the one exception.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MUST_RUN_IN_CI = ("vllm", "ray", "smollm2", "tmpfs")  # named in the failure, so it says what CI lacks
MAY_SKIP_IN_CI = ("gpu",)  # CI runs on CPU
TMPFS_FIXTURE = "small_tmpfs"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _reason(longrepr: object) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: why")
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tmpfs: mounts a small real file system (needs root, as CI has); "
                                       "set on every test that uses the small_tmpfs fixture")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TMPFS_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.tmpfs)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} was skipped at collection ({_reason(report.longrepr)}); in CI every "
                           "test must be collected and run (skip inside a marked test or fixture instead).")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(m) for m in MAY_SKIP_IN_CI):
        return
    needed = [m for m in MUST_RUN_IN_CI if item.get_closest_marker(m)]
    why = _reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{item.nodeid} needs {needed} and was skipped ({why}); in CI these tests must run." if needed
                       else f"{item.nodeid} was skipped ({why}); in CI only `gpu` tests may skip.")


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The tiny random Llama (built once per machine into the rlpost cache)."""
    from rl.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct from the package-index wheel, converted once and cached."""
    from rl.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`mount(size_bytes)` mounts a real tmpfs of that size and returns its path; unmounted after the test.

    A real full file system, not a mocked exception: writers fail on it the way they do on a full disk.
    Mounting needs root (CI runs as root); elsewhere the test skips, which under CI is a failure.
    """
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not mount a tmpfs at {where}: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(where)], check=False)
