"""tests/conftest.py under CI: a skip of a test that needs vLLM, Ray, SmolLM2 or a tmpfs, and any skip at
collection time, is a failure; without CI they stay skips. Runs a tiny test tree with the project's conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PROJECT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

TREE = {
    "test_missing_module.py": """
        import pytest
        pytest.importorskip("rlpost_no_such_module")  # a collection-time skip: no test item ever exists

        def test_never_collected():
            pass
    """,
    "test_marked.py": """
        import pytest

        @pytest.mark.smollm2
        def test_smollm2_skips_inside():
            pytest.skip("model not available")

        @pytest.mark.vllm
        def test_vllm_skips_inside():
            pytest.skip("vllm not installed")

        @pytest.mark.ray
        @pytest.mark.skipif(True, reason="no ray")
        def test_ray_skipif():
            pass

        def test_unmarked_skips_inside():
            pytest.skip("nothing to do")

        @pytest.mark.gpu
        def test_gpu_skips_inside():
            pytest.skip("no CUDA device")  # CI is CPU-only: the one skip allowed there

        def test_runs():
            pass
    """,
}


@pytest.fixture
def tree(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(PROJECT_CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    vllm\n    ray\n    smollm2\n    gpu\n")
    pytester.makepyfile(**TREE)
    return pytester


def test_under_ci_a_collection_time_skip_and_marked_skips_fail(tree, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = tree.runpytest_subprocess("--continue-on-collection-errors", "-rA")
    outcomes = result.parseoutcomes()
    assert "skipped" not in outcomes or outcomes["skipped"] == 1, result.stdout.str()  # only the gpu one
    assert outcomes.get("errors") == 2 and outcomes.get("failed") == 3 and outcomes.get("passed") == 1, outcomes
    out = result.stdout.str()
    assert "test_missing_module.py" in out and "skipped at collection" in out
    assert "needs ['ray']" in out and "needs ['vllm']" in out and "needs ['smollm2']" in out
    assert "test_unmarked_skips_inside" in out and "in CI only `gpu` tests may skip" in out
    assert result.ret != 0


def test_without_ci_they_are_skips(tree, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = tree.runpytest_subprocess("-rA")
    assert result.parseoutcomes() == {"skipped": 6, "passed": 1}, result.stdout.str()
    assert result.ret == 0
