"""Suite-wide settings: offline hub, and in CI a skipped vLLM/Ray test is a failure."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MUST_RUN_IN_CI = ("vllm", "ray")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (os.environ.get("CI") and report.skipped):
        return
    needed = [m for m in MUST_RUN_IN_CI if item.get_closest_marker(m)]
    if needed:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} needs {needed} and was skipped; in CI these tests must run."


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
