"""Shared helpers for the rollout tests."""

from __future__ import annotations

import torch

from rl.batch import RolloutBatch
from rl.config import load_job
from rl.loop.runtime import build_env
from rl.models import load_tokenizer


def prompts_for(model_dir: str, job: str = "tiny", count: int = 4, overrides: tuple[str, ...] = ()):
    cfg = load_job(job, list(overrides))
    return list(build_env(cfg, load_tokenizer(model_dir)).test_prompts())[:count]


def learner_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """[N, T] log p(input_ids[:, t] | input_ids[:, :t]) from one plain fp32 forward, aligned with the
    tokens they score (column 0 has no context and stays 0), independent of the trainers package."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)            # [N, T-1, V] predicts t+1
    scored = logp.gather(2, batch.input_ids[:, 1:, None]).squeeze(2)          # [N, T-1]
    return torch.cat([torch.zeros_like(scored[:, :1]), scored], dim=1)        # [N, T]


def mean_abs_logprob_diff(model, batch: RolloutBatch, temperature: float) -> float:
    """Mean |learner - sampler| logprob over the sampled (loss-mask) tokens."""
    mask = batch.loss_mask
    assert int(mask.sum()) > 0
    diff = (learner_logprobs(model, batch, temperature) - batch.sampling_logprobs).abs()[mask]
    return float(diff.mean())
