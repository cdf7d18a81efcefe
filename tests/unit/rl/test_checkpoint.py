import pytest
import torch

import rl.loop.checkpoint as ckpt
from rl.loop.checkpoint import (
    CheckpointError,
    latest_intact_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    single_file_weights,
    verify_checkpoint,
    weights_writer,
)


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
