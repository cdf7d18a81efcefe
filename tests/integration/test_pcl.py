"""PCL through the real CLI on the tiny model: curriculum metrics are logged and resume is exact."""

from __future__ import annotations

import shutil

import torch
from helpers import metrics, rl, stable

PCL = ["curriculum={name: pcl, pool_factor: 3}", 'env={name: arithmetic, digits: [1, 2], test_size: 16}',
       "trainer.max_steps=3", "trainer.save_every_steps=1"]


def _no_clock(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in stable(rows)]


def test_pcl_logs_its_metrics_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    done = rl("train", "tiny", f"run_dir={full}", *PCL)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(full)
    for key in ("curriculum/value_mse", "curriculum/selected_pred_mean", "curriculum/select_seconds",
                "curriculum/pool_size", "reward/varied_group_frac"):
        assert all(key in r for r in rows), key
    assert rows[0]["curriculum/pool_size"] == 6.0
    assert (full / "checkpoints" / "step_3" / "curriculum.pt").is_file()
    # Resume from step 2 (as if killed during step 3): the value head and its optimizer come back exactly.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_3")
    resumed = rl("train", "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _no_clock(metrics(cut)) == _no_clock(rows)
    a = torch.load(full / "checkpoints" / "step_3" / "curriculum.pt", weights_only=False)
    b = torch.load(cut / "checkpoints" / "step_3" / "curriculum.pt", weights_only=False)
    assert a["updates"] == b["updates"] == 3
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
