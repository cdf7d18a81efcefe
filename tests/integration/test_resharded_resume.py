"""A run resumed at another number of learner ranks continues as the run that was not interrupted, through the
real CLI on the tiny job (issue 22): 2 ranks -> 1 and 1 -> 2, from the sharded step_2 checkpoint.

The interrupted run is the uninterrupted one's directory cut back to its step_2 checkpoint (the driver truncates
metrics.jsonl to the checkpoint's step), resumed with `rl train --resume RUN cluster.learners=K`. Steps 3 and 4
must log the same loss and reward (relative 1e-5: N ranks sum in another order) and end at the same weights, read
from each run's step_4 checkpoint in one process (as `rl eval` and `rl export` read them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import metrics, rl, stable

from rl.loop.policy_state import is_sharded
from rl.loop.standalone import learner_from_checkpoint

ARGS = ["trainer.max_steps=4", "trainer.save_every_steps=2", "trainer.keep_last=2"]
COMPARED = ("loss", "reward/mean", "grad_norm")


def _run(tmp_path: Path, name: str, learners: int) -> Path:
    run = tmp_path / name
    done = rl("train", "tiny", f"run_dir={run}", f"cluster.learners={learners}", *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner_from_checkpoint(str(checkpoint)).model.state_dict().items()}


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(2, 1), (1, 2)])
def test_a_run_resumed_at_another_number_of_ranks_continues_as_before(saved_with, resumed_with, tmp_path):
    full = _run(tmp_path, "full", saved_with)
    assert is_sharded(full / "checkpoints" / "step_2")
    shards = list((full / "checkpoints" / "step_2" / "policy").glob("*.distcp"))
    assert len(shards) == saved_with  # every rank wrote its own shards
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_4")

    resumed = rl("train", "--resume", str(cut), f"cluster.learners={resumed_with}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 2" in resumed.stdout

    want, got = stable(metrics(full)), stable(metrics(cut))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for w, g in zip(want[2:], got[2:]):
        for key in (k for k in COMPARED if k in w):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    before, after = _weights(full / "checkpoints" / "step_2"), _weights(full / "checkpoints" / "step_4")
    resumed_weights = _weights(cut / "checkpoints" / "step_4")
    assert any(not torch.equal(before[k], after[k]) for k in after), "steps 3-4 changed nothing: nothing to compare"
    diff = max(float((resumed_weights[k] - after[k]).abs().max()) for k in after)
    assert diff <= 1e-5, diff


def test_export_reads_a_checkpoint_that_two_ranks_wrote(tmp_path):
    from transformers import AutoModelForCausalLM

    run = _run(tmp_path, "two", 2)
    checkpoint = run / "checkpoints" / "step_4"
    out = tmp_path / "exported"
    done = rl("export", str(checkpoint), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = learner_from_checkpoint(str(checkpoint)).model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
