"""The learner process's object: the policy (with its adapter), the optimiser, the reference policy.

It consumes scored `RolloutBatch`es and produces weights for the rollout side; it never generates.
Local mode holds it directly; `cluster: ray` hosts it in an actor and calls the same methods.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from rl.batch import RolloutBatch
from rl.models import load_causal_lm, load_tokenizer


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Learner:
    """Owns the trainable policy; `train_step`, weight export for sync, checkpoint state."""

    def __init__(self, job: Any, model_dir: str) -> None:
        from trainers import adapters
        from trainers.policy import PolicyTrainer

        torch.manual_seed(job.seed)
        self.job = job
        self.model_dir = model_dir
        self.device = pick_device(job.trainer.device)
        self._adapters = adapters
        model = load_causal_lm(model_dir, job.model.dtype, self.device)
        self.model = adapters.apply_adapter(model, job.adapter)
        self.trainer = PolicyTrainer(self.model, job.algorithm, job.trainer, temperature=job.rollout.temperature,
                                     device=self.device)
        # Built on the trainer's optimizer, which exists only now: a RoSA restart clears the adapters' moments.
        self.trainer.adapter_schedule = adapters.schedule_for(self.model, job.adapter, self.trainer.optimizer)

    # ----- training --------------------------------------------------------------------------
    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        return self.trainer.step(batch)

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[N, T] no-grad logprobs of `batch`'s tokens under the current policy (0 off the loss mask);
        SAPO uses them as external rows' sampling logprobs (rl/swarm/node.py)."""
        return self.trainer._batch_logprobs(self.model, batch)

    # ----- weight sync -----------------------------------------------------------------------
    def sync_payload(self, want_lora: bool) -> dict[str, Any]:
        """What the rollout side needs to match this policy.

        `lora`: the adapter in PEFT-LoRA form as file bytes (exact; hot-loadable by vLLM), when the
        adapter has an exact LoRA form and the engine wants it; otherwise merged full weights.
        """
        if want_lora and self.job.adapter is not None:
            with tempfile.TemporaryDirectory() as tmp:
                if self._adapters.lora_form(self.model, tmp):
                    return {"kind": "lora", "files": {p.name: p.read_bytes() for p in Path(tmp).iterdir()}}
        if self.job.adapter is None:
            weights = {k: v.detach() for k, v in self.model.state_dict().items()}
        else:
            weights = self._adapters.merged_state_dict(self.model)
        return {"kind": "full", "tensors": {k: v.to("cpu") for k, v in weights.items()}}

    # ----- checkpoints -----------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.job.adapter is None:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        else:
            weights = {k: v.detach().cpu() for k, v in self._adapters.adapter_state_dict(self.model).items()}
        return weights, self.trainer.state_dict()

    def load_checkpoint_state(self, weights: Mapping[str, torch.Tensor], trainer_state: Mapping[str, Any]) -> None:
        if self.job.adapter is None:
            self.model.load_state_dict(dict(weights), strict=True)
        else:
            self._adapters.load_adapter_state_dict(self.model, dict(weights))
        self.trainer.load_state_dict(dict(trainer_state))

    def export(self, out_dir: str) -> None:
        self._adapters.export_merged(self.model, load_tokenizer(self.model_dir), out_dir)
