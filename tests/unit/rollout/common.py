"""Shared helpers for the rollout tests."""

from __future__ import annotations

import torch

from rl.batch import RolloutBatch
from rl.config import load_job
from rl.models import load_tokenizer
from rl.runtime import build_env
from trainers.logprobs import token_logprobs


def prompts_for(model_dir: str, job: str = "tiny", count: int = 4, overrides: tuple[str, ...] = ()):
    cfg = load_job(job, list(overrides))
    return list(build_env(cfg, load_tokenizer(model_dir)).test_prompts())[:count]


def learner_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, temperature)
    return logp


def mean_abs_logprob_diff(model, batch: RolloutBatch, temperature: float) -> float:
    mask = batch.loss_mask
    diff = (learner_logprobs(model, batch, temperature) - batch.sampling_logprobs).abs()[mask]
    return float(diff.mean())
