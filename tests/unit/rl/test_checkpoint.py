import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rl.loop.checkpoint as ckpt
from rl.loop.checkpoint import (
    CheckpointError,
    DiskFullError,
    latest_intact_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    single_file_weights,
    verify_checkpoint,
    weights_writer,
)
from rl.loop.policy_state import is_sharded, load_policy_state, save_policy_state


def save(run_dir, step, value, keep_last=5, **kw):
    return save_checkpoint(run_dir, step, policy=weights_writer({"w": torch.full((4, 4), float(value))},
                                                                {"opt": {"m": torch.ones(2) * value}}),
                           state={"step": step},
                           config_yaml="name: t\n", keep_last=keep_last, **kw)


def test_roundtrip_and_manifest(tmp_path):
    path = save(tmp_path, 3, 1.5)
    assert path.name == "step_3" and verify_checkpoint(path) is None
    payload = load_checkpoint(path)
    assert torch.equal(single_file_weights(path)["w"], torch.full((4, 4), 1.5))
    assert payload["state"] == {"step": 3} and payload["config_yaml"] == "name: t\n"
    assert torch.equal(payload["trainer_state"]["opt"]["m"], torch.ones(2) * 1.5)


def test_flipped_byte_is_detected_and_skipped(tmp_path):
    save(tmp_path, 1, 1.0)
    newest = save(tmp_path, 2, 2.0)
    weights = newest / ckpt.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "checksum" in verify_checkpoint(newest)
    reasons = []
    chosen = latest_intact_checkpoint(tmp_path, report=reasons.append)
    assert chosen.step == 1 and "step_2" in reasons[0]
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(newest)


def test_half_written_checkpoint_is_never_chosen(tmp_path):
    save(tmp_path, 1, 1.0)

    def crash(tmp):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, 2.0, before_rename=crash)
    (tmp_path / "checkpoints" / "step_3").mkdir()  # renamed but empty: no manifest
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 1]
    assert latest_intact_checkpoint(tmp_path, report=lambda m: None).step == 1


MIB = 1 << 20
# One piece of a checkpoint made larger than the 1 MiB file system, so its writer is the one that runs out of space:
# safetensors (SafetensorError), torch.save (RuntimeError from its C++ stream) or a plain write (OSError).
TOO_BIG = {
    "weights": {"weights": {"w": torch.zeros(MIB // 2)}},
    "trainer_state": {"trainer_state": {"opt": {"m": torch.zeros(MIB // 2)}}},
    "config_yaml": {"config_yaml": "x" * (2 * MIB)},
}


@pytest.mark.parametrize("writer", sorted(TOO_BIG))
def test_a_real_full_disk_removes_the_partial_checkpoint_and_keeps_the_previous(small_tmpfs, writer):
    fs = small_tmpfs(MIB)
    save(fs, 1, 1.0)
    args = {"weights": {"w": torch.ones(4, 4)}, "trainer_state": {}, "state": {"step": 2}, "config_yaml": "name: t\n",
            **TOO_BIG[writer]}
    with pytest.raises(CheckpointError, match=r"(?i)no space left") as raised:
        save_checkpoint(fs, 2, policy=weights_writer(args.pop("weights"), args.pop("trainer_state")), **args)
    message = str(raised.value)
    assert str(fs) in message and f"rl train --resume {fs}" in message and "step_1 is intact" in message, message
    assert [c.step for c in list_checkpoints(fs)] == [1]
    assert not list((fs / "checkpoints").glob(".tmp-*"))
    assert torch.equal(single_file_weights(fs / "checkpoints" / "step_1")["w"], torch.ones(4, 4))
    save(fs, 2, 2.0)  # the space the partial checkpoint took is back
    assert [c.step for c in list_checkpoints(fs)] == [2, 1]


class _RefusesPickling:
    def __reduce__(self):
        raise RuntimeError("this object cannot be saved")


def test_a_writer_error_on_a_roomy_disk_is_raised_as_is_and_cleaned_up(tmp_path):
    save(tmp_path, 1, 1.0)
    with pytest.raises(RuntimeError, match="cannot be saved") as raised:  # the same type torch.save raises when full
        save_checkpoint(tmp_path, 2, policy=weights_writer({"w": torch.ones(2)}, {"x": _RefusesPickling()}),
                        state={"step": 2}, config_yaml="name: t\n")
    assert not isinstance(raised.value, CheckpointError)  # not mistaken for a full disk
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, step, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [5, 4]


# ----- the sharded format: the policy written by torch.distributed.checkpoint into policy/ ----------------------
def small_policy(width: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(3, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def sharded_writer(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    def write(tmp):
        save_policy_state(model, optimizer, tmp)
        return {"updates": 1}

    return write


def save_sharded(run_dir, step, model, optimizer, **kw):
    return save_checkpoint(run_dir, step, policy=sharded_writer(model, optimizer), state={"step": step},
                           config_yaml="name: t\n", keep_last=5, **kw)


def test_the_manifest_covers_the_policy_shards(tmp_path):
    model, optimizer = small_policy()
    save_sharded(tmp_path, 1, model, optimizer)
    newest = save_sharded(tmp_path, 2, model, optimizer)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    assert {"policy/.metadata", "policy/__0_0.distcp", "trainer.pt"} <= set(manifest)
    assert is_sharded(newest) and single_file_weights(newest) is None
    shard = newest / "policy" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(newest) == "policy/__0_0.distcp does not match its checksum"
    assert latest_intact_checkpoint(tmp_path, report=lambda m: None).step == 1


def test_a_sharded_checkpoint_interrupted_before_the_rename_leaves_the_previous_one(tmp_path):
    model, optimizer = small_policy()
    first = save_sharded(tmp_path, 1, model, optimizer)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def crash(tmp):
        assert (tmp / "policy" / ".metadata").is_file() and (tmp / ckpt.MANIFEST).is_file()  # all but the rename
        raise KeyboardInterrupt

    model(torch.ones(3, 8)).sum().backward()
    optimizer.step()
    with pytest.raises(KeyboardInterrupt):
        save_sharded(tmp_path, 2, model, optimizer, before_rename=crash)
    assert [c.step for c in list_checkpoints(tmp_path)] == [1] and verify_checkpoint(first) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh, fresh_optimizer = small_policy()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_policy_state(fresh, fresh_optimizer, first)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import save_sharded, small_policy
model, optimizer = small_policy()
save_sharded({run!r}, 2, model, optimizer, before_rename=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_a_writer_killed_before_the_rename_leaves_no_checkpoint_and_the_previous_intact(tmp_path):
    """A real SIGKILL of the writing process between its last file and the rename."""
    model, optimizer = small_policy()
    save_sharded(tmp_path, 1, model, optimizer)
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), run=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    stale = list((tmp_path / "checkpoints").glob(".tmp-step_2-*"))
    assert len(stale) == 1 and (stale[0] / ckpt.MANIFEST).is_file()  # it had written everything
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    assert latest_intact_checkpoint(tmp_path, report=lambda m: None).step == 1
    save_sharded(tmp_path, 3, model, optimizer)  # the next checkpoint removes what the killed writer left
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 1]


def test_a_full_disk_while_the_shards_are_written_is_disk_full(small_tmpfs):
    """DCP reports a failed write as a CheckpointException holding each rank's error; it is still a full disk."""
    fs = small_tmpfs(MIB)
    small, small_optimizer = small_policy()
    save_sharded(fs, 1, small, small_optimizer)
    big, big_optimizer = small_policy(width=512)  # 1 MiB of weights, 3 MiB with the Adam moments
    with pytest.raises(DiskFullError, match=r"(?i)no space left") as raised:
        save_sharded(fs, 2, big, big_optimizer)
    assert "step_1 is intact" in str(raised.value) and f"rl train --resume {fs}" in str(raised.value)
    assert not list((fs / "checkpoints").glob(".tmp-*"))
    assert [c.step for c in list_checkpoints(fs)] == [1]
    assert verify_checkpoint(fs / "checkpoints" / "step_1") is None


def test_parameters_without_optimizer_state_resume_without_it(tmp_path):
    """AdamW keeps no state for a parameter that never had a gradient (RoSA's sparse values before the mask, a
    parameter whose moments a RoSA restart cleared): it resumes without state too, and the next updates match."""
    model, optimizer = small_policy()
    model[1].weight.grad = None  # the second layer: only its bias gets updates, so its weight has no Adam state
    optimizer.state.pop(model[1].weight)
    save_sharded(tmp_path, 1, model, optimizer)
    fresh, fresh_optimizer = small_policy(width=8)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh_optimizer.state.clear()
    load_policy_state(fresh, fresh_optimizer, tmp_path / "checkpoints" / "step_1")
    assert fresh[1].weight not in fresh_optimizer.state and len(fresh_optimizer.state) == len(optimizer.state)
    for run_model, run_optimizer in ((model, optimizer), (fresh, fresh_optimizer)):
        run_optimizer.zero_grad(set_to_none=True)
        run_model(torch.ones(3, 8)).sum().backward()
        run_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
