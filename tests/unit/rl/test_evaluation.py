"""Held-out evaluation: the unbiased pass@k estimator and what the report computes it from."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rl.config import load_job
from rl.config.job import JobConfig
from rl.errors import UserError
from rl.loop.evaluation import evaluate, pass_at_k
from rl.types import Prompt


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 1 - 3/10 = 0.7
    (5, 2, 1, 0.4),                                      # pass@1 = c / n
    (10, 3, 4, 1 - 35 / 210),                            # 1 - C(7,4)/C(10,4)
    (5, 0, 3, 0.0),
    (5, 4, 2, 1.0),                                      # fewer than k wrong samples: certain
    (4, 1, 4, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_issue_example():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)


def test_default_ks_are_powers_of_two_up_to_n_and_n():
    from rl.loop.evaluation import report_ks

    assert report_ks(8, None) == [1, 2, 4, 8]
    assert report_ks(5, None) == [1, 2, 4, 5]
    assert report_ks(5, [4, 2, 4]) == [1, 2, 4]  # pass@1 always; sorted, unique
    with pytest.raises(UserError, match="samples"):
        report_ks(4, [8])


class FakeRollout:
    """Greedy: every prompt right. Sampled: prompt 0 has its first `c0` of each group right, prompt 1 none.
    Records the group sizes it was asked for."""

    def __init__(self, c0: int) -> None:
        self.c0, self.group_sizes = c0, []

    def generate(self, prompts, params):
        self.group_sizes.append(params.group_size)
        g = params.group_size
        if params.greedy:
            right = [True] * len(prompts)
        else:
            right = [i // g == 0 and i % g < self.c0 for i in range(len(prompts) * g)]
        n = len(right)
        return SimpleNamespace(num_samples=n, completion_texts=["42" if r else "no" for r in right],
                               completion_lengths=torch.ones(n, dtype=torch.long), right=right)


class FakeScorer:
    def __init__(self, label: str) -> None:
        self.label = label

    def score(self, batch, shaped=True):
        r = torch.tensor([1.0 if x else 0.0 for x in batch.right])
        return SimpleNamespace(total=r, components={self.label: r})


def test_report_computes_pass_at_k_from_all_n_samples():
    """N = 5 samples per prompt, k in {1, 2, 4}: prompt 0 has c = 2, prompt 1 has c = 0. With n = 5,
    pass@2 = (0.7 + 0) / 2 = 0.35, pass@1 = (0.4 + 0) / 2 = 0.2, pass@4 = (1 + 0) / 2 = 0.5
    (n = k would give pass@2 from 2 samples only)."""
    job = JobConfig.model_validate({"eval": {"samples": 5, "k": [2, 4]}})
    rollout = FakeRollout(c0=2)
    prompts = [Prompt(prompt_id=str(i), text="q", token_ids=(1,), meta={}) for i in range(2)]
    report, records = evaluate(rollout, FakeScorer(job.rewards[0].label), prompts, job)
    assert rollout.group_sizes == [1, 5]  # greedy, then N = 5 samples per prompt (not k)
    assert report["samples"] == 5 and report["accuracy"] == 1.0
    assert report["pass@1"] == pytest.approx(0.2)
    assert report["pass@2"] == pytest.approx(0.35)
    assert report["pass@4"] == pytest.approx(0.5)
    assert not any(key.startswith("pass@") for key in set(report) - {"pass@1", "pass@2", "pass@4"})
    assert sum(r["mode"] == "sampled" for r in records) == 10


def test_k_above_samples_is_a_validation_error():
    with pytest.raises(UserError, match=r"eval\.k"):
        load_job("tiny", ["eval.samples=4", "eval.k=[1, 8]"])
    assert load_job("tiny", ["eval.samples=8", "eval.k=[1, 8]"]).eval.k == [1, 8]


def test_cli_k_above_samples_exits_2_with_one_paragraph():
    done = subprocess.run([sys.executable, "-m", "rl.cli", "eval", "tiny-llama", "--job", "tiny", "--samples", "2",
                           "--k", "1", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "eval.k" in done.stderr and "--samples" in done.stderr and "Traceback" not in done.stderr
