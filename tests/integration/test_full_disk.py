"""A real full disk during a checkpoint, through the real CLI on the tiny job.

The run directory is on a small tmpfs that a filler file leaves room for one and a half checkpoints: step 1's
checkpoint fits, step 2's runs out of space inside `torch.save` (which raises RuntimeError, not OSError). The run
must stop with exit 2 and one paragraph (space needed, where, the resume command), no traceback and no temporary
directory; step 1's checkpoint stays intact, and once the filler is deleted `rl train --resume` finishes the run
exactly as an uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import metrics, rl, stable

from rl.loop.checkpoint import list_checkpoints, verify_checkpoint

ARGS = ["trainer.max_steps=3", "trainer.save_every_steps=1", "trainer.keep_last=3"]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run on a roomy disk: the size of one checkpoint, and the metrics a resumed run must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = rl("train", "tiny", f"run_dir={run}", *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_a_disk_that_fills_during_a_checkpoint_stops_the_run_cleanly_and_it_resumes(reference, small_tmpfs):
    checkpoint_bytes = _bytes(reference / "checkpoints" / "step_1")
    fs = small_tmpfs(4 * checkpoint_bytes)
    filler = fs / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(fs).free - int(1.5 * checkpoint_bytes)))
    run = fs / "run"

    done = rl("train", "tiny", f"run_dir={run}", *ARGS)

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr[done.stderr.index("error: "):].strip()
    assert "\n" not in message, message  # one paragraph
    assert "no space left" in message.lower() and str(fs) in message and "MiB" in message, message
    assert f"rl train --resume {run}" in message and "step_1" in message, message
    assert not list((run / "checkpoints").glob(".tmp-*")), "a partial checkpoint was left behind"
    assert [c.step for c in list_checkpoints(run)] == [1]
    assert verify_checkpoint(run / "checkpoints" / "step_1") is None

    filler.unlink()  # the user frees space, then runs the command the message gave
    resumed = rl("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 1" in resumed.stdout
    assert [c.step for c in list_checkpoints(run)] == [3, 2, 1]
    assert stable(metrics(run)) == stable(metrics(reference))


def test_a_full_disk_outside_a_checkpoint_is_one_message_not_a_traceback(small_tmpfs):
    """An evaluation report written to a full file system: exit 2 and the message, no traceback."""
    fs = small_tmpfs(1 << 20)
    (fs / "filler").write_bytes(bytes(shutil.disk_usage(fs).free))  # the disk is now really full

    done = rl("eval", "tiny-llama", "--job", "tiny", "--num-prompts", "4", "--out", str(fs / "report.json"))

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left" in done.stderr and "rl train --resume" in done.stderr, done.stderr[-3000:]
