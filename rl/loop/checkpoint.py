"""Atomic, verifiable checkpoints: `run_dir/checkpoints/step_<N>/`.

A checkpoint is written into `checkpoints/.tmp-step_<N>-<pid>/`, every file fsynced, a manifest of
SHA-256 checksums written last, and only then renamed to `step_<N>` (rename is atomic on POSIX).
So a directory named `step_<N>` is complete unless its bytes were later damaged, which the manifest
catches: resume walks checkpoints newest first and takes the first one whose manifest verifies.

Files: `policy/` (the policy's trainable weights and optimizer state, sharded: every learner rank writes its
shards there with torch.distributed.checkpoint, and it loads at any number of ranks; rl/loop/policy_state.py),
`trainer.pt` (scheduler and counters), `rng.pt` (python/numpy/torch RNG states), `state.json` (step, policy
version, data cursor, ...), `config.yaml` (the resolved job), `manifest.json` (every file, those under `policy/`
too), and with a curriculum `curriculum.pt` (its learned state, e.g. the PCL value head and its optimizer).
Checkpoints written before the sharded format hold `weights.safetensors` (full weights, or the adapter's) and the
optimizer inside `trainer.pt`; they still load (on one learner rank). Only rank 0 (the driver) writes the files
besides `policy/`, and the manifest once every rank has finished its shards.

A full disk stops the run with `DiskFullError` (a `UserError`: one paragraph, exit 2): the writers report it
differently (`torch.save` as a RuntimeError from its C++ stream with no errno, safetensors as a SafetensorError
whose text holds "os error 28", Python's own writes as OSError ENOSPC, DCP as a CheckpointException holding each
rank's error), so it is recognised by the errno where
one exists and otherwise by the file system really lacking the room the checkpoint still needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rl.errors import OUT_OF_SPACE, UserError

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CURRICULUM = "curriculum.pt"  # optional: the curriculum's learned state (PCL value head + optimizer)
PREFIX = "step_"
MIB = 1 << 20
# What the writers raise when a write fails: torch.save wraps the stream error in RuntimeError, safetensors in
# SafetensorError; only OSError carries the errno. DCP's CheckpointException (a BaseException holding every rank's
# error) is recognised by its name, so that this module does not import DCP (seconds) for an isinstance check.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
DCP_ERROR = "CheckpointException"
PolicyWriter = Callable[[Path], Mapping[str, object]]
"""Writes the policy into a checkpoint directory on every learner rank; returns the trainer state (rank 0's)."""


class CheckpointError(UserError):
    """A checkpoint could not be written (the previous one is intact) or none could be read."""


class DiskFullError(CheckpointError):
    """The file system holding the run directory ran out of space while a checkpoint was written."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _files(root: Path) -> list[str]:
    """Every file under `root`, as sorted POSIX paths relative to it (`policy/.metadata`, ...)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _write_files(tmp: Path, policy: PolicyWriter, state: Mapping[str, Any], config_yaml: str,
                 curriculum_state: Mapping[str, Any] | None) -> None:
    torch.save(dict(policy(tmp)), tmp / "trainer.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    if curriculum_state is not None:
        torch.save(dict(curriculum_state), tmp / CURRICULUM)
    (tmp / "state.json").write_text(json.dumps(dict(state), indent=1, sort_keys=True))
    (tmp / "config.yaml").write_text(config_yaml)
    files = _files(tmp)
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for name in [*files, MANIFEST]:
        _fsync(tmp / name)
    for sub in (p for p in tmp.rglob("*") if p.is_dir()):  # the entries of policy/ itself
        _fsync(sub)


def weights_writer(weights: Mapping[str, torch.Tensor], trainer_state: Mapping[str, object]) -> PolicyWriter:
    """A `PolicyWriter` of the single-file format (`weights.safetensors`, the optimizer inside `trainer.pt`):
    what one process without a learner writes, e.g. the checkpoint tests' small states."""

    def write(tmp: Path) -> Mapping[str, object]:
        # safetensors refuses shared or non-contiguous storage; checkpoint tensors are independent copies.
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in weights.items()}, str(tmp / WEIGHTS))
        return trainer_state

    return write


def save_checkpoint(run_dir: str | Path, step: int, *, policy: PolicyWriter, state: Mapping[str, Any],
                    config_yaml: str, keep_last: int = 3, before_rename: Callable[[Path], None] | None = None,
                    curriculum_state: Mapping[str, Any] | None = None, command: str = "rl train",
                    keep_key: str = "trainer.keep_last") -> Path:
    """Write `checkpoints/step_<step>` atomically, then prune to the newest `keep_last`.

    `command` and `keep_key` word the advice of a failure for the run's own CLI (`rl train-rm`: `train.keep_last`).

    `policy(tmp)` writes the policy into the temporary directory (on every learner rank: `Learner.save_policy`)
    and returns the trainer state; this process then writes the rest and the manifest.

    Any failure removes the partial temp directory and leaves every earlier checkpoint untouched. A full disk
    raises `DiskFullError` (space needed, where, how to resume), another OSError (e.g. permissions)
    `CheckpointError`; anything else is re-raised as it is.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, policy, state, config_yaml, curriculum_state)
        if before_rename is not None:
            before_rename(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): replace it only once the new one is whole
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    except BaseException as exc:
        needed = max(_checkpoint_bytes(root), _dir_bytes(tmp) + _tensor_bytes(curriculum_state))
        full = _out_of_space(exc, root, needed - _dir_bytes(tmp))  # judged while the partial files still take room
        if full:  # the failed writer's frames hold its open file, whose blocks an unlink alone does not free
            for link in _exception_chain(exc):
                traceback.clear_frames(link.__traceback__)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(_disk_full_message(Path(run_dir), final, needed, command, keep_key)) from exc
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}. Earlier "
                                  f"checkpoints are intact; fix the cause and continue with "
                                  f"`{command} --resume {run_dir}`.") from exc
        raise
    prune_checkpoints(root, keep_last)
    return final


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and inside a DCP CheckpointException every rank's error and its chain."""
    chain: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        link: BaseException | None = pending.pop()
        while link is not None and link not in chain:
            chain.append(link)
            pending.extend(_rank_failures(link))
            link = link.__cause__ or link.__context__
    return chain


def _rank_failures(exc: BaseException) -> list[BaseException]:
    if type(exc).__name__ != DCP_ERROR:
        return []
    from rl.loop.policy_state import write_failures  # DCP is loaded already: it raised this

    return write_failures(exc)


def _reports_out_of_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: as OSError.errno, or as Rust's "(os error 28)" text (safetensors)."""
    for link in _exception_chain(exc):
        if isinstance(link, OSError) and link.errno in OUT_OF_SPACE:
            return True
        if any(f"(os error {code})" in str(link) for code in OUT_OF_SPACE):
            return True
    return False


def _out_of_space(exc: BaseException, root: Path, still_needed: int) -> bool:
    """Whether a failed write was the disk filling up. torch.save's error has no errno, so it counts only when the
    file system really has less room than the checkpoint still needed (at least a MiB): a writer error with
    space to spare (an unpicklable object, a bug) is never reported as a full disk."""
    if not isinstance(exc, WRITE_ERRORS) and type(exc).__name__ != DCP_ERROR:
        return False
    if _reports_out_of_space(exc):
        return True
    try:
        return shutil.disk_usage(root).free < max(still_needed, MIB)
    except OSError:
        return False


def _disk_full_message(run_dir: Path, final: Path, needed: int, command: str, keep_key: str) -> str:
    free = shutil.disk_usage(final.parent).free
    previous = next(iter(list_checkpoints(run_dir)), None)
    head = (f"no space left on the file system mounted at {_mount_point(final.parent)} (it holds {run_dir}) while "
            f"writing checkpoint {final.name}: a checkpoint of this run takes about {_size(needed)} and "
            f"{_size(free)} are free, so free at least {_size(max(needed - free, 0))} more there "
            f"(fewer kept checkpoints help too: the next one is written beside the `{keep_key}` newest). "
            "The partial checkpoint was removed.")
    if previous is None:
        return f"{head} No earlier checkpoint exists: start the run again with `{command}` once there is room."
    return (f"{head} {previous.path.name} is intact: continue from it with `{command} --resume {run_dir}` "
            f"(optionally with {keep_key}=1).")


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 1024:.1f} KiB"


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _checkpoint_bytes(root: Path) -> int:
    """The size of the newest complete checkpoint (0 if none): what the next one will take."""
    newest = next(iter(list_checkpoints(root.parent)), None)
    return _dir_bytes(newest.path) if newest is not None else 0


def _tensor_bytes(obj: object) -> int:
    """The tensor bytes in nested dicts/lists: a lower bound on a checkpoint's size before the first is written."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root.parent)[keep_last:]:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a killed writer; never a valid checkpoint
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Complete-looking checkpoints (renamed into place), newest first; not yet verified."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found.append(Checkpoint(path, int(suffix)))
    return sorted(found, key=lambda c: c.step, reverse=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if every file matches the manifest, else the reason it does not."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_intact_checkpoint(run_dir: str | Path, report: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint that verifies; each skipped one is reported with its reason."""
    for ckpt in list_checkpoints(run_dir):
        problem = verify_checkpoint(ckpt.path)
        if problem is None:
            return ckpt
        report(f"skipping checkpoint {ckpt.path}: {problem}")
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """What the driver reads of a verified checkpoint: trainer_state, rng, state, config_yaml, curriculum (or None).
    The policy itself (`policy/`, or an older checkpoint's `weights.safetensors`) is read by the learner ranks
    (`Learner.load_policy`)."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}. Use an earlier checkpoint.")
    return {
        "trainer_state": torch.load(path / "trainer.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
        "state": json.loads((path / "state.json").read_text()),
        "config_yaml": (path / "config.yaml").read_text(),
        "curriculum": torch.load(path / CURRICULUM, weights_only=False) if (path / CURRICULUM).is_file() else None,
    }


def single_file_weights(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The weights of a checkpoint in the single-file format (`weights.safetensors`), None for a sharded one."""
    file = Path(path) / WEIGHTS
    return load_file(str(file)) if file.is_file() else None
