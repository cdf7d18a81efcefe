"""The policy's part of a checkpoint: its weights and optimizer state, sharded with `torch.distributed.checkpoint`.

Every learner rank calls `save_policy_state` / `load_policy_state` together (they are collective). DCP writes each
rank's shards of the FSDP2 DTensors into `<checkpoint>/policy/` with a `.metadata` file naming every tensor by its
FQN and its global shape, so the same directory loads at any number of ranks: 2 -> 1 and 1 -> 2 reshard on load.
On one process without a process group DCP runs without collectives (`rl export`, `rl eval`, one learner rank).

What is saved is what changes in training: every trainable parameter, every buffer (an adapter's persistent
buffers define it: RoSA's support indices and ready flags, PaCA's column indices and original columns) and the
optimizer's state, all keyed by FQN. Frozen parameters (an adapter's base weights, also a tied alias such as
`lm_head.weight`) are rebuilt from the model directory, as in the single-file format this replaced.

The run directory must be on a file system every learner rank sees (one node's disk; NFS/Lustre across nodes).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    OptimizerStateType,
    StateDictOptions,
    ValueType,
    get_state_dict,
    set_state_dict,
)

from rl.errors import UserError

POLICY_DIR = "policy"
METADATA = ".metadata"  # DCP's index of the shards, written last by its coordinator (rank 0)
CheckpointException = dcp.CheckpointException  # what DCP raises on every rank when any rank failed
ModelState = dict[str, ValueType]
"""FQN -> tensor: a plain tensor on one rank, a DTensor (this rank's shard) under FSDP2."""
# Frozen tensors are left out on save; on load DCP fills only what was saved and `strict` would demand the rest.
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def policy_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / POLICY_DIR


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` holds its policy in the sharded (DCP) format."""
    return (policy_dir(checkpoint) / METADATA).is_file()


def _frozen_names(model: torch.nn.Module) -> set[str]:
    """FQNs of frozen parameters, tied aliases included (DCP's own filter misses `lm_head.weight` when it is tied
    to a frozen embedding)."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[ModelState, OptimizerStateType]:
    """(FQN -> tensor, DTensor shards under FSDP2; the FQN-keyed optimizer state)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    frozen = _frozen_names(model)
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_policy_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | Path) -> None:
    """Collective: every rank writes its shards into `checkpoint/policy/`; returns once all ranks have finished,
    so the caller (rank 0) can checksum the whole directory."""
    model_state, optim_state = _state(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=policy_dir(checkpoint))
    _barrier()


def load_policy_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | Path) -> None:
    """Collective: load `checkpoint/policy/` into `model` and `optimizer` as they are sharded now, whatever the
    number of ranks that saved it. A checkpoint of another model or adapter is a `UserError`."""
    model_state, optim_state = _load_target(model, optimizer, checkpoint)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=policy_dir(checkpoint))
    except CheckpointException as exc:
        raise UserError(f"checkpoint {checkpoint} does not match this policy ({_first_failure(exc)}); was it saved "
                        "with the same model and adapter config? Resume it with its own config.yaml.") from None
    result = set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                            options=OPTIONS)
    frozen = _frozen_names(model)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise UserError(f"checkpoint {checkpoint} does not match this policy: missing {missing[:5]}, unexpected "
                        f"{list(result.unexpected_keys)[:5]}. Resume it with its own config.yaml.")
    _barrier()


def _load_target(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: str | Path
                 ) -> tuple[ModelState, OptimizerStateType]:
    """This rank's tensors to load into: the model's, and optimizer state for exactly the parameters that had
    state when saved. AdamW keeps none for a parameter that never had a gradient (RoSA's sparse values before the
    mask, or after a restart cleared them); such a parameter resumes without state, as it would have continued."""
    optimizer.zero_grad(set_to_none=True)  # without gradients get_state_dict gives every parameter zero state
    optimizer.state.clear()  # the checkpoint replaces it all
    model_state, optim_state = _state(model, optimizer)
    saved = set(dcp.FileSystemReader(str(policy_dir(checkpoint))).read_metadata().state_dict_metadata)
    per_param = optim_state["state"]
    assert isinstance(per_param, dict), "get_state_dict keys the optimizer state by FQN"
    optim_state["state"] = {fqn: entries for fqn, entries in per_param.items()
                            if isinstance(entries, dict) and any(f"optim.state.{fqn}.{k}" in saved for k in entries)}
    return model_state, optim_state


def _first_failure(exc: CheckpointException) -> str:
    failures = list(exc.failures.values())
    return str(failures[0][0]).splitlines()[0] if failures else str(exc)


def write_failures(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside a DCP `CheckpointException` (e.g. each rank's OSError ENOSPC); [] otherwise."""
    if not isinstance(exc, CheckpointException):
        return []
    return [failure for failure, _trace in exc.failures.values()]
