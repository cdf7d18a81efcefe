"""The learner process's object: the policy (with its adapter), the optimiser, the reference policy.

It consumes scored `RolloutBatch`es and produces weights for the rollout side; it never generates.
Local mode holds it directly; `cluster: ray` hosts it in an actor and calls the same methods.

With N learner ranks (`cluster.learners`, rl/loop/distributed.py) one PolicyLearner lives in each rank's
process, built after the process joined the group: the policy is FSDP2-sharded over the ranks
(trainers/sharding.py), every method is collective (call it on every rank, in the same order), and what it
returns for the rollout side or the driver (weights, logprobs) is whole on rank 0 only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.models import load_causal_lm, load_tokenizer
from rl.types import FullWeights, LoraFiles, SharedModel, SyncMode, WeightSync

if TYPE_CHECKING:
    from rl.config.job import JobConfig


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class PolicyLearner:
    """Owns the trainable policy; `train_step`, weight export for sync, checkpoint state (a `rl.types.Learner`)."""

    def __init__(self, job: JobConfig, model_dir: str) -> None:
        from trainers import adapters
        from trainers.policy import PolicyTrainer
        from trainers.sharding import RankGroup, shard_policy

        torch.manual_seed(job.seed)  # the same seed on every rank: every rank starts from the same adapter init
        self.job = job
        self.model_dir = model_dir
        self.group = RankGroup.current()
        self.device = pick_device(job.trainer.device)
        if self.device == "cuda" and self.group.sharded:  # one GPU per rank (Ray narrows CUDA_VISIBLE_DEVICES)
            self.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if "LOCAL_RANK" in os.environ else "cuda"
        self._adapters = adapters
        model = load_causal_lm(model_dir, job.model.dtype, self.device)
        self.model = adapters.apply_adapter(model, job.adapter)
        root = shard_policy(self.model, self.device, self.group) if self.group.sharded else None
        self._replica: torch.nn.Module | None = None  # rank 0's whole copy for weight export (N ranks only)
        self.trainer = PolicyTrainer(self.model, job.algorithm, job.trainer, temperature=job.rollout.temperature,
                                     device=self.device, root=root, group=self.group)
        # Built on the trainer's optimizer, which exists only now: a RoSA restart clears the adapters' moments.
        self.trainer.adapter_schedule = adapters.schedule_for(self.model, job.adapter, self.trainer.optimizer)

    # ----- training --------------------------------------------------------------------------
    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self.trainer.step(batch)

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[N, T] no-grad logprobs of `batch`'s tokens under the current policy (0 off the loss mask);
        SAPO uses them as external rows' sampling logprobs (rl/swarm/node.py). N ranks: each computes its
        groups' rows, rank 0 returns them all."""
        if not self.group.sharded:
            return self.trainer._batch_logprobs(self.model, batch)
        share = self.group.share(batch)
        with self.trainer.lockstep.phase(backward=False):
            mine = None if share is None else self.trainer._batch_logprobs(self.model, share)
        parts = [p for p in self.group.gather(mine) if p is not None]  # shares are consecutive rows, in rank order
        return torch.cat(parts) if parts else torch.zeros(batch.input_ids.shape)

    # ----- weight sync -----------------------------------------------------------------------
    def weights(self, mode: SyncMode) -> WeightSync:
        """What the rollout side needs to match this policy in sync `mode` (rl/loop/weights.py `sync_mode`)."""
        build: dict[SyncMode, Callable[[], WeightSync]] = {
            "shared": SharedModel, "full": self._full_weights, "lora": self._lora_files}
        return build[mode]()

    def _full_weights(self) -> FullWeights:
        """Merged full weights on CPU (the adapter merged out of place); empty on ranks other than 0."""
        if self.group.sharded and self.job.adapter is None:  # the gathered weights are the policy's
            return FullWeights(self._gathered())
        policy = self._whole_policy()
        if policy is None:
            return FullWeights({})
        if self.job.adapter is None:
            weights = {k: v.detach() for k, v in policy.state_dict().items()}
        else:
            weights = self._adapters.merged_state_dict(policy)
        return FullWeights({k: v.to("cpu") for k, v in weights.items()})

    def _gathered(self) -> dict[str, torch.Tensor]:
        """The sharded policy's whole state dict on rank 0's CPU (empty elsewhere); collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def _whole_policy(self) -> torch.nn.Module | None:
        """The policy with whole parameters for the adapter's export code: the policy itself on one rank; on N
        ranks a CPU replica on rank 0 loaded with the gathered weights (None on the others). Collective."""
        if not self.group.sharded:
            return self.model
        state = self._gathered()
        if self.group.rank != 0:
            return None
        if self._replica is None:  # built once: the same architecture and adapter, weights overwritten below
            base = load_causal_lm(self.model_dir, self.job.model.dtype, "cpu")
            self._replica = self._adapters.apply_adapter(base, self.job.adapter)
        self._replica.load_state_dict(state, strict=True)
        return self._replica

    def _lora_files(self) -> LoraFiles:
        """The adapter in its exact PEFT-LoRA form as file bytes (hot-loadable by vLLM); empty off rank 0."""
        policy = self._whole_policy()
        if policy is None:
            return LoraFiles({})
        with tempfile.TemporaryDirectory() as tmp:
            if self.job.adapter is None or not self._adapters.lora_form(policy, tmp):
                raise ValueError(f"sync mode 'lora' for adapter {self.job.adapter!r}, which has no exact LoRA form "
                                 "(trainers.adapters.lora_form_rank and lora_form disagree)")
            return LoraFiles({p.name: p.read_bytes() for p in Path(tmp).iterdir()})

    # ----- checkpoints -----------------------------------------------------------------------
    def save_policy(self, checkpoint_dir: str) -> dict[str, object]:
        """Collective: every rank writes its shards of the trainable weights, adapter buffers and optimizer state
        into `checkpoint_dir/policy/` (rl/loop/policy_state.py) and returns once all have; the result is the
        trainer's schedule and counters, for the driver's `trainer.pt`."""
        from rl.loop.policy_state import save_policy_state

        save_policy_state(self.model, self.trainer.optimizer, checkpoint_dir)
        return {k: v for k, v in self.trainer.state_dict().items() if k != "optimizer"}

    def load_policy(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        """Collective: load a checkpoint's policy into this learner's shards, whatever number of ranks saved it;
        `trainer_state` is the checkpoint's `trainer.pt`."""
        from rl.loop.policy_state import is_sharded, load_policy_state

        if not is_sharded(checkpoint_dir):
            self._load_single_file(checkpoint_dir, trainer_state)
            return
        # The schedule and counters; the optimizer keeps its own state here, then takes the saved one from policy/.
        self.trainer.load_state_dict({**trainer_state, "optimizer": self.trainer.optimizer.state_dict()})
        load_policy_state(self.model, self.trainer.optimizer, checkpoint_dir)

    def _load_single_file(self, checkpoint_dir: str, trainer_state: Mapping[str, object]) -> None:
        """A checkpoint from before the sharded format: `weights.safetensors`, the optimizer inside `trainer.pt`."""
        from rl.loop.checkpoint import single_file_weights

        weights = single_file_weights(checkpoint_dir)
        if weights is None:
            raise UserError(f"{checkpoint_dir} holds no policy (neither policy/ nor weights.safetensors).")
        if self.group.sharded:  # its optimizer state is keyed by parameter order, which says nothing about shards
            raise UserError(f"{checkpoint_dir} is a single-file checkpoint (from before sharded checkpoints), which "
                            "loads on one learner rank only: resume it with cluster.learners=1 until its next "
                            "checkpoint, which is sharded and resumes at any number of ranks.")
        if self.job.adapter is None:
            self.model.load_state_dict(weights, strict=True)
        else:
            self._adapters.load_adapter_state_dict(self.model, weights)
        self.trainer.load_state_dict(dict(trainer_state))

    def export(self, out_dir: str) -> None:
        policy = self._whole_policy()
        if policy is not None:
            self._adapters.export_merged(policy, load_tokenizer(self.model_dir), out_dir)
