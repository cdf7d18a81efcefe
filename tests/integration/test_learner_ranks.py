"""N learner ranks make the update one rank makes (issue 22): FSDP2 over gloo, 2 real processes."""

from __future__ import annotations

import pytest
import torch

from rl.config import load_job
from rl.loop import steps
from rl.loop.learner import PolicyLearner
from rl.models import resolve_model
from tests.integration.ranks_testlib import run_ranks
from tests.unit.trainers.trainer_testlib import build_batch

ADAPTERS = {"full": [], "lora": ["adapter.name=lora", "adapter.r=4", "adapter.alpha=8"],
            "bone": ["adapter.name=bone", "adapter.r=4"], "rosa": ["adapter.name=rosa", "adapter.r=4"],
            "paca": ["adapter.name=paca", "adapter.r=4"],
            "prefix_grouper": ["trainer.shared_prefix=true"]}  # full fine-tuning through the shared-prefix forward


def _job(kind: str, learners: int, extra: tuple[str, ...] = ()):
    # max_grad_norm huge: clipping rescales the gradient to norm 1 and would hide a wrong gradient scale;
    # lr small: Adam's first step moves a weight by ~lr whatever its gradient, so weights alone prove little
    # correction pinned: `auto` resolves by whether the sampler is the learner, which 2 ranks never are
    return load_job("tiny", [f"cluster.learners={learners}", "trainer.lr=1e-5", "trainer.max_grad_norm=1e9",
                             "algorithm.correction.level=token",
                             *ADAPTERS[kind], *extra])


def _batch(job):
    # 3 groups of 4 (an odd count: the ranks get 2 and 1 groups), different lengths (different packings)
    batch = build_batch([3, 5, 4, 2] * 3, [4, 2, 6, 3, 5, 1, 2, 6, 3, 3, 4, 2], group_size=4, vocab=100,
                        rewards=[1, 0, 0.5, 0, 0, 1, 1, 0, 0.2, 0.9, 0.1, 0])
    return steps.advantages(job, batch)[0]


def _train(rank: int, kind: str, learners: int, extra: tuple[str, ...]) -> dict:
    job = _job(kind, learners, extra)
    learner = PolicyLearner(job, resolve_model("tiny-llama"))
    grads: list[torch.Tensor] = []

    def record(optimizer, args, kwargs) -> None:
        whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731  (a DTensor shard)
        # a parameter without a gradient (RoSA's sparse part before its warm-up ends) counts as zeros
        parts = [whole(p.grad) if p.grad is not None else torch.zeros(p.shape) for g in optimizer.param_groups
                 for p in g["params"]]
        grads.append(torch.cat([g.detach().flatten().clone() for g in parts]))

    learner.trainer.optimizer.register_step_pre_hook(record)
    metrics = learner.train_step(_batch(job))
    weights = learner.weights("full").tensors
    return {"metrics": metrics, "weights": dict(weights), "grads": grads}


def _train_each(rank: int, kinds: tuple[str, ...], learners: int) -> dict[str, dict]:
    # one spawn of the ranks for every adapter: starting the processes costs more than the updates
    return {kind: _train(rank, kind, learners, ()) for kind in kinds}


KINDS = tuple(ADAPTERS)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return run_ranks(_train_each, 2, tmp_path_factory.mktemp("ranks"), KINDS, 2)[0]  # rank 0 holds the weights


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_make_the_one_rank_update(kind: str, two_ranks: dict[str, dict]) -> None:
    one, two = _train(0, kind, 1, ()), two_ranks[kind]
    (g1,), (g2,) = one["grads"], two["grads"]
    assert torch.allclose(g2, g1, rtol=1e-5, atol=1e-9), float((g2 - g1).abs().max())
    assert set(two["weights"]) == set(one["weights"])
    diff = max(float((two["weights"][k] - one["weights"][k]).abs().max()) for k in one["weights"])
    assert diff <= 1e-6, diff
    for key in ("loss", "policy/entropy", "grad_norm", "clip_frac"):
        if key in one["metrics"]:
            assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-7), key
