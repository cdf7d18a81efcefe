"""A user-defined loss (and advantage) in a file outside the package, loaded by `algorithm.loss: {name: custom,
import_path}` (`algorithm.advantage: ...`) and trained for 2 steps on the tiny job through the real CLI (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import checkpoint_weights, metrics, rl

USER_LOSS = '''
"""My objectives: REINFORCE with a scaled advantage, plus one with an extra input from `prepare`."""
import torch

from rl.types import Objective


def scaled_reinforce(logp, old_logp, adv, mask, cfg):
    """-(scale * A) log pi; reports the scale it was given (kwargs reach the loss through cfg.kwargs) and the
    mean |A| over loss tokens (what the advantage stage produced)."""
    scale = float(cfg.kwargs["scale"])
    stats = {"my_stat": torch.tensor(scale), "my_adv_abs": (adv.abs() * mask).sum() / mask.sum().clamp(min=1)}
    return -scale * adv * logp, stats


def signed_constant(rewards, group_ids, cfg):
    """A user advantage: +v above the batch's mean reward, -v otherwise, so |A| = v on every row."""
    v = float(cfg.kwargs["value"])
    return torch.where(rewards > rewards.mean(), torch.tensor(v), torch.tensor(-v))


def length_inputs(ctx, mini, cfg):
    """One row-aligned input per sample: its completion length (loss tokens), computed once per mini-batch."""
    assert isinstance(ctx.model, torch.nn.Module) and ctx.temperature > 0
    return {"lengths": mini.loss_mask.sum(1).float()}


def length_weighted(logp, old_logp, adv, mask, cfg, lengths):
    weight = 1.0 / lengths.clamp(min=1)  # [b]
    stats = {"my_length_mean": (lengths * 1.0).mean().detach(), "my_stat": torch.tensor(float(cfg.kwargs["scale"]))}
    return -adv * weight.unsqueeze(1) * logp * cfg.kwargs["scale"], stats


LENGTH_WEIGHTED = Objective(length_weighted, prepare=length_inputs)
'''


def _train(tmp_path, name: str, attr: str, scale: float, *overrides: str) -> tuple[list[dict], object]:
    code = tmp_path / "my_losses.py"
    code.write_text(USER_LOSS)
    run = tmp_path / name
    loss = yaml.safe_dump({"name": "custom", "import_path": f"{code}:{attr}", "kwargs": {"scale": scale}},
                          default_flow_style=True).strip()
    done = rl("train", "tiny", f"run_dir={run}", "trainer.max_steps=2", f"algorithm.loss={loss}",
              *(o.format(code=code) for o in overrides), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(run), run


def _assert_trained(rows: list[dict], run) -> None:
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float) and not k.startswith("eval")), row
    first = checkpoint_weights(run / "checkpoints" / "step_1")
    second = checkpoint_weights(run / "checkpoints" / "step_2")
    assert any(not torch.equal(first[k], second[k]) for k in first), "the custom loss's update changed no weight"


def test_a_plain_user_function_is_the_loss_and_another_the_advantage(tmp_path):
    advantage = "algorithm.advantage={{name: custom, import_path: '{code}:signed_constant', kwargs: {{value: 0.25}}}}"
    rows, run = _train(tmp_path, "plain", "scaled_reinforce", 3.0, advantage)
    _assert_trained(rows, run)
    assert [r["my_stat"] for r in rows] == [3.0, 3.0]  # the user's function ran, with the job's kwargs
    assert [r["my_adv_abs"] for r in rows] == pytest.approx([0.25, 0.25], rel=1e-5)  # the user's advantage fed it


def test_a_user_objective_with_a_prepare_hook(tmp_path):
    rows, run = _train(tmp_path, "prepared", "LENGTH_WEIGHTED", 0.5)
    _assert_trained(rows, run)
    assert all(r["my_stat"] == 0.5 and 1.0 <= r["my_length_mean"] <= 8.0 for r in rows)  # its input arrived
