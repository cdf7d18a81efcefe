"""Atomic, verifiable checkpoints: `run_dir/checkpoints/step_<N>/`.

A checkpoint is written into `checkpoints/.tmp-step_<N>-<pid>/`, every file fsynced, a manifest of
SHA-256 checksums written last, and only then renamed to `step_<N>` (rename is atomic on POSIX).
So a directory named `step_<N>` is complete unless its bytes were later damaged, which the manifest
catches: resume walks checkpoints newest first and takes the first one whose manifest verifies.

Files: `weights.safetensors` (full weights, or adapter weights with an adapter), `trainer.pt`
(optimizer, scheduler, counters), `rng.pt` (python/numpy/torch RNG states), `state.json` (step,
policy version, data cursor, ...), `config.yaml` (the resolved job), `manifest.json`, and with a curriculum
`curriculum.pt` (its learned state, e.g. the PCL value head and its optimizer).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rl.errors import UserError

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CURRICULUM = "curriculum.pt"  # optional: the curriculum's learned state (PCL value head + optimizer)
PREFIX = "step_"


class CheckpointError(UserError):
    """A checkpoint could not be written (the previous one is intact) or none could be read."""


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


def _write_files(tmp: Path, weights: Mapping[str, torch.Tensor], trainer_state: Mapping[str, Any],
                 state: Mapping[str, Any], config_yaml: str, curriculum_state: Mapping[str, Any] | None) -> None:
    # safetensors refuses shared or non-contiguous storage; checkpoint tensors are independent copies.
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(dict(trainer_state), tmp / "trainer.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    if curriculum_state is not None:
        torch.save(dict(curriculum_state), tmp / CURRICULUM)
    (tmp / "state.json").write_text(json.dumps(dict(state), indent=1, sort_keys=True))
    (tmp / "config.yaml").write_text(config_yaml)
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for name in files + [MANIFEST]:
        _fsync(tmp / name)


def save_checkpoint(run_dir: str | Path, step: int, *, weights: Mapping[str, torch.Tensor],
                    trainer_state: Mapping[str, Any], state: Mapping[str, Any], config_yaml: str,
                    keep_last: int = 3, before_rename: Callable[[Path], None] | None = None,
                    curriculum_state: Mapping[str, Any] | None = None) -> Path:
    """Write `checkpoints/step_<step>` atomically, then prune to the newest `keep_last`.

    A failure (disk full, permissions) removes the partial temp directory, leaves every earlier
    checkpoint untouched, and raises `CheckpointError` naming the cause.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, weights, trainer_state, state, config_yaml, curriculum_state)
        if before_rename is not None:
            before_rename(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): replace it only once the new one is whole
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}. Earlier checkpoints "
                              "are intact; free disk space or fix permissions and resume.") from exc
    prune_checkpoints(root, keep_last)
    return final


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
    """Everything a checkpoint holds: weights, trainer_state, rng, state, config_yaml, curriculum (or None)."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}. Use an earlier checkpoint.")
    return {
        "weights": load_file(str(path / WEIGHTS)),
        "trainer_state": torch.load(path / "trainer.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
        "state": json.loads((path / "state.json").read_text()),
        "config_yaml": (path / "config.yaml").read_text(),
        "curriculum": torch.load(path / CURRICULUM, weights_only=False) if (path / CURRICULUM).is_file() else None,
    }
