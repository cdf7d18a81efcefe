"""LoRA pushes to a real vLLM engine leave no adapter folders behind: the worker keeps only the one the engine
serves, and none after a full-weight push or at shutdown; generation after the deletions uses the newest adapter."""

import tempfile
from pathlib import Path

import pytest
import torch
from common import prompts_for

from rl.config import load_job
from rl.loop.learner import PolicyLearner
from rl.loop.weights import sync_mode
from rl.loop.worker import EngineWorker
from rl.types import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
JOB = ["rollout.backend=vllm", "adapter={name: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"]
# The engine against the learner on the same tokens, fp32 (vLLM's CPU kernels vs torch's): measured about 1e-6
# here; another adapter moves them by far more than this.
SAME_POLICY = 1e-3


def _adapter_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("rlpost-lora-*"))


def _new_adapter(learner: PolicyLearner, seed: int) -> None:
    """Nonzero, seed-specific LoRA B matrices: each version is a different policy."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def _max_diff(learner: PolicyLearner, batch) -> float:
    mask = batch.loss_mask
    assert int(mask.sum()) > 0
    return float((learner.logprobs(batch) - batch.sampling_logprobs).abs()[mask].max())


def test_lora_pushes_keep_only_the_served_adapter(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a private temp dir: count only our folders
    job = load_job("tiny", JOB)
    learner = PolicyLearner(job, tiny_model_dir)
    worker = EngineWorker(job, tiny_model_dir)
    prompts = prompts_for(tiny_model_dir, count=2)
    params = SamplingParams(group_size=2, max_new_tokens=6, temperature=1.0, seed=1)
    try:
        assert sync_mode(job) == "lora"
        for version in range(1, 5):
            _new_adapter(learner, version)
            worker.load_weights(learner.weights("lora"), version)
            assert len(_adapter_dirs(tmp_path)) == 1, _adapter_dirs(tmp_path)
            if version == 2:  # the engine has loaded (and so cached) an adapter before its folder goes
                worker.generate(prompts, params)
        assert "rlpost-lora-v4-" in _adapter_dirs(tmp_path)[0].name
        batch = worker.generate(prompts, params)
        assert batch.policy_version == 4
        newest = _max_diff(learner, batch)
        _new_adapter(learner, 3)  # the learner back on the previous version's adapter
        previous = _max_diff(learner, batch)
        print(f"engine vs learner, max |diff|: newest adapter {newest:.2e}, previous adapter {previous:.2e}")
        assert newest < SAME_POLICY < previous
        worker.load_weights(learner.weights("full"), 5)  # full weights replace the adapter: no folder is needed
        assert _adapter_dirs(tmp_path) == []
        _new_adapter(learner, 6)
        worker.load_weights(learner.weights("lora"), 6)
        assert len(_adapter_dirs(tmp_path)) == 1
    finally:
        worker.close()
    assert _adapter_dirs(tmp_path) == []  # shutdown removes the last one


def test_engine_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    """vLLM takes max_lora_rank only from a fixed set (1, 8, 16, ...): an r=4 adapter needs an engine of rank 8."""
    from rollout._vllm_internals import engine_lora_rank

    assert [engine_lora_rank(r) for r in (1, 4, 8, 9, 16, 17)] == [1, 8, 8, 16, 16, 32]
