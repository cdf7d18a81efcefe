"""`rl eval` and `rl export` through the real CLI on tiny runs (full fine-tuning and LoRA)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from helpers import rl

from rl.loop.policy_state import is_sharded


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    done = rl("train", "tiny", f"run_dir={run}", "trainer.max_steps=2", "adapter={name: lora, r: 4, alpha: 8}",
              "trainer.lr=0.05")
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_sharded(run / "checkpoints" / "step_2")  # eval and export read the sharded format
    return run


def test_eval_reports_on_checkpoint_and_alias(lora_run, tmp_path):
    ckpt = lora_run / "checkpoints" / "step_2"
    out = tmp_path / "report.json"
    done = rl("eval", str(ckpt), "--job", "tiny", "--samples", "4", "--k", "2", "--num-prompts", "6", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["n"] == 6 and 0.0 <= report["accuracy"] <= 1.0 and report["samples"] == 4
    assert report["length_mean"] > 0 and "reward_mean" in report
    assert sorted(k for k in report if k.startswith("pass@")) == ["pass@1", "pass@2"]
    records = [json.loads(x) for x in (tmp_path / "report.samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 + 24 and {r["mode"] for r in records} == {"greedy", "sampled"}
    # pass@k from all n = 4 samples of each prompt (the unbiased estimator), recomputed from the records
    right = Counter(r["prompt_id"] for r in records if r["mode"] == "sampled" and r["correct"])
    prompts = {r["prompt_id"] for r in records if r["mode"] == "sampled"}
    for k in (1, 2):
        expected = sum(1 - math.comb(4 - right[p], k) / math.comb(4, k) for p in prompts) / len(prompts)
        assert report[f"pass@{k}"] == pytest.approx(expected, abs=1e-9)
    done = rl("eval", "tiny-llama", "--job", "tiny", "--num-prompts", "4", "--out", str(tmp_path / "base.json"))
    assert done.returncode == 0 and json.loads((tmp_path / "base.json").read_text())["n"] == 4


def test_export_merges_the_adapter_into_a_loadable_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from rl.loop.standalone import learner_from_checkpoint

    ckpt = lora_run / "checkpoints" / "step_2"
    out = tmp_path / "exported"
    done = rl("export", str(ckpt), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out)
    learner = learner_from_checkpoint(str(ckpt))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = learner.model(ids).logits
        got = exported(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad(), learner.model.disable_adapter():
        base = learner.model(ids).logits
    assert not torch.allclose(base, expected, atol=1e-4)  # training changed the policy
    assert rl("export", str(ckpt), "--out", str(out)).returncode == 2  # refuses a non-empty directory


def test_eval_of_a_non_model_is_a_clear_error(tmp_path):
    done = rl("eval", str(tmp_path), "--job", "tiny")
    assert done.returncode == 2 and "neither a checkpoint" in done.stderr
