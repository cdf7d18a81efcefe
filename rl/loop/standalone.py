"""Loading a policy outside a training run: for `rl eval` and `rl export`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rl.errors import UserError
from rl.loop.checkpoint import MANIFEST, load_checkpoint

if TYPE_CHECKING:
    from rl.config.job import JobConfig
    from rl.loop.cluster import RolloutPool
    from rl.loop.learner import PolicyLearner
    from rl.types import Env, Scorer


def _is_checkpoint(target: str) -> bool:
    return (Path(target) / MANIFEST).is_file()


def _checkpoint_job(path: str, overrides: list[str] | None = None) -> JobConfig:
    from rl.config import load_job

    return load_job(str(Path(path) / "config.yaml"), overrides or [])


def learner_from_checkpoint(path: str) -> PolicyLearner:
    """A learner holding a checkpoint's policy (its own job config decides model and adapter), in this one process:
    a sharded checkpoint of any number of ranks loads here without a process group."""
    from rl.loop.learner import PolicyLearner
    from rl.models import resolve_model

    job = _checkpoint_job(path)
    payload = load_checkpoint(path)
    learner = PolicyLearner(job, resolve_model(job.model.path, job.model.cache_dir))
    learner.load_policy(path, payload["trainer_state"])
    return learner


@contextmanager
def policy_for_target(target: str, job: JobConfig) -> Iterator[tuple[RolloutPool, Scorer, Env]]:
    """(rollout pool, scorer, env) for evaluating TARGET with `job`'s env, rewards and sampling."""
    from rl.loop.cluster import LocalWorkers, RolloutPool
    from rl.loop.runtime import build_env, build_scorer
    from rl.loop.weights import sync_mode
    from rl.loop.worker import EngineWorker
    from rl.models import load_tokenizer, resolve_model

    if _is_checkpoint(target):
        learner = learner_from_checkpoint(target)
        model_dir = learner.model_dir
        eval_job = job.model_copy(update={"adapter": learner.job.adapter, "model": learner.job.model})
        if job.rollout.backend == "hf":  # samples with the checkpoint's policy itself, whatever the job's mode
            worker = EngineWorker(eval_job, model_dir, shared_model=learner.model)
        else:
            worker = EngineWorker(eval_job, model_dir)
            worker.load_weights(learner.weights(sync_mode(eval_job)), version=1)
    elif Path(target).is_dir() and not (Path(target) / "config.json").is_file():
        raise UserError(f"{target} is neither a checkpoint (no {MANIFEST}) nor a model directory (no config.json).")
    else:
        model_dir = resolve_model(target, job.model.cache_dir)
        worker = EngineWorker(job.model_copy(update={"adapter": None}), model_dir)
    tokenizer = load_tokenizer(model_dir)
    scorer = build_scorer(job)
    try:
        yield RolloutPool(LocalWorkers([worker])), scorer, build_env(job, tokenizer)
    finally:
        worker.close()
        scorer.close()


def export_command(checkpoint: str, out: str) -> int:
    """`rl export CHECKPOINT --out DIR`: a Hugging Face directory with the adapter merged."""
    if not _is_checkpoint(checkpoint):
        raise UserError(f"{checkpoint} is not a checkpoint directory (no {MANIFEST}); pass "
                        "runs/<name>/checkpoints/step_<N>.")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new directory.")
    learner_from_checkpoint(checkpoint).export(out)
    print(f"exported {checkpoint} -> {out} (loadable with transformers' from_pretrained and vLLM)")
    return 0
