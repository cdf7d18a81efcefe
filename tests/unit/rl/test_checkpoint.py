import errno

import pytest
import torch

import rl.checkpoint as ckpt
from rl.checkpoint import (CheckpointError, latest_intact_checkpoint, list_checkpoints, load_checkpoint,
                           save_checkpoint, verify_checkpoint)


def save(run_dir, step, value, keep_last=5, **kw):
    return save_checkpoint(run_dir, step, weights={"w": torch.full((4, 4), float(value))},
                           trainer_state={"opt": {"m": torch.ones(2) * value}}, state={"step": step},
                           config_yaml="name: t\n", keep_last=keep_last, **kw)


def test_roundtrip_and_manifest(tmp_path):
    path = save(tmp_path, 3, 1.5)
    assert path.name == "step_3" and verify_checkpoint(path) is None
    payload = load_checkpoint(path)
    assert torch.equal(payload["weights"]["w"], torch.full((4, 4), 1.5))
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


def test_disk_full_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save(tmp_path, 1, 1.0)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", enospc)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save(tmp_path, 2, 2.0)
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert torch.equal(load_checkpoint(tmp_path / "checkpoints" / "step_1")["weights"]["w"], torch.ones(4, 4))


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, step, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [5, 4]
