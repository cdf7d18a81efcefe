"""The policy trainer: turns a scored `RolloutBatch` into optimizer steps. It never generates.

Per rollout batch: `old` logprobs once (skipped when there is a single optimizer step, where they
equal the first forward's values), reference logprobs if KL is on, then `ppo_epochs` passes of
`mini_batches` optimizer steps, each accumulated over micro-batches packed by a token budget.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import torch

from rl.batch import RolloutBatch
from rl.errors import UserError
from rl.registries import AGGREGATIONS, LOSSES
from trainers.aggregation import Normalisers
from trainers.logprobs import token_logprobs
from trainers.losses import kl_penalty, mismatch_kl, mismatch_weights
from trainers.reference import ReferencePolicy
from trainers.schedule import build_optimizer


class NonFiniteError(UserError):
    """Repeated non-finite losses or gradients: stop rather than write NaN weights."""


class PolicyTrainer:
    def __init__(self, model: Any, algorithm: Any, trainer: Any, temperature: float, backend: str, device: str,
                 max_new_tokens: int = 64, adapter_schedule: Any = None) -> None:
        self.model, self.algo, self.cfg, self.device = model, algorithm, trainer, device
        self.temperature = temperature
        self.loss_fn: Callable = LOSSES.get(algorithm.loss.name)
        self.aggregate: Callable = AGGREGATIONS.get(algorithm.aggregation.name)
        self.constant_length = float(getattr(algorithm.aggregation, "max_length", None) or max_new_tokens)
        level = algorithm.correction.level
        self.correction = ("token" if backend == "vllm" else "none") if level == "auto" else level
        self.reference = ReferencePolicy(model) if algorithm.kl.coef > 0 else None
        total_updates = trainer.max_steps * trainer.ppo_epochs * trainer.mini_batches
        self.optimizer, self.scheduler = build_optimizer(model, trainer, total_updates)
        self.adapter_schedule = adapter_schedule
        self.updates = 0
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        if trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ----- one rollout batch -------------------------------------------------------------------
    def step(self, batch: RolloutBatch) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        batch = self._with_reference(batch)
        minis = batch.split_by_groups(self.cfg.mini_batches)
        olds = [self._old_logprobs(m) for m in minis]  # before any update: pi_old is the sampling-time policy
        stats: list[dict[str, float]] = []
        for _ in range(self.cfg.ppo_epochs):
            for mini, old in zip(minis, olds):
                stats.append(self._update(mini, old))
        metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        tokens = float(batch.completion_lengths.sum())
        metrics.update({"lr": self.scheduler.get_last_lr()[0], "train/tokens_per_s": tokens / (time.perf_counter() - start),
                        "train/skipped_nonfinite": float(self.nonfinite_total), "train/updates": float(self.updates)})
        return metrics

    def _single_update(self) -> bool:
        return self.cfg.ppo_epochs * self.cfg.mini_batches == 1

    def _with_reference(self, batch: RolloutBatch) -> RolloutBatch:
        if batch.advantages is None:
            raise ValueError("PolicyTrainer.step needs a batch with advantages")
        if self.reference is None:
            return batch
        return batch.with_ref_logprobs(self.reference.logprobs(batch, self._logprobs))

    def _old_logprobs(self, mini: RolloutBatch) -> torch.Tensor | None:
        """None for a single optimizer step: then pi_old = pi_theta and the training forward's own
        (detached) values are exact, which saves a whole forward pass."""
        if self._single_update():
            return None
        with torch.no_grad():
            return self._logprobs(mini, with_entropy=False)[0]

    def _logprobs(self, batch: RolloutBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        with self._autocast():
            return token_logprobs(self.model, to(batch.input_ids), to(batch.attention_mask), to(batch.loss_mask),
                                  self.temperature, self.cfg.logprob_chunk_tokens, with_entropy)

    def _autocast(self) -> Any:
        enabled = self.device.startswith("cuda")
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled) if enabled else _null()

    # ----- one optimizer step ------------------------------------------------------------------
    def _update(self, mini: RolloutBatch, old: torch.Tensor | None) -> dict[str, float]:
        norm = Normalisers(tokens=float(mini.loss_mask.sum()), sequences=float(mini.num_samples),
                           constant_length=self.constant_length)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for rows, micro in pack_micro_batches(mini, self.cfg.micro_batch_tokens):
            micro_old = None if old is None else old[rows, : micro.seq_len]
            loss, stats = self._micro_loss(micro, norm, micro_old)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params(), self.cfg.max_grad_norm) if finite else None
        if grad_norm is None or not torch.isfinite(grad_norm):
            return self._skip(sums)
        if self.adapter_schedule is not None:
            self.adapter_schedule.before_optimizer_step(self.model, self.updates)
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1
        self.nonfinite_streak = 0
        return {**sums, "grad_norm": float(grad_norm)}

    def _skip(self, sums: dict[str, float]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive updates had a non-finite loss or gradient; stopping before "
                "NaN reaches the weights. Lower trainer.lr, check rewards for extreme values, or use "
                "model.dtype=float32. The last checkpoint is intact: resume after changing the job.")
        return {**sums, "grad_norm": math.nan}

    def _micro_loss(self, micro: RolloutBatch, norm: Normalisers,
                    old: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        logp, entropy = self._logprobs(micro, with_entropy=True)
        dev = lambda t: t.to(self.device)  # noqa: E731
        mask = dev(micro.loss_mask).float()  # [B, T]
        old = logp.detach() if old is None else old
        adv = dev(micro.advantages)
        adv = adv.unsqueeze(1).expand_as(logp) if adv.dim() == 1 else adv  # [B, T]
        per_token, stats = self.loss_fn(logp, old, adv, mask, self.algo.loss)
        sampling = dev(micro.sampling_logprobs)
        if self.correction != "none":
            per_token = per_token * mismatch_weights(old, sampling, mask, self.correction, self.algo.correction.cap)
        kl = torch.zeros(())
        if self.reference is not None:
            kl_tok = kl_penalty(logp, dev(micro.ref_logprobs), self.algo.kl.estimator)
            per_token = per_token + self.algo.kl.coef * kl_tok
            kl = (kl_tok.detach() * mask).sum() / max(norm.tokens, 1.0)
        loss = self.aggregate(per_token, mask, norm, self.algo.aggregation)
        share = float(mask.sum()) / max(norm.tokens, 1.0)  # token share: metrics become mini-batch means
        out = {"loss": float(loss.detach()), "kl": float(kl),
               "policy/entropy": float((entropy * mask).sum()) / max(norm.tokens, 1.0),
               "policy/mismatch_kl": float(mismatch_kl(old.detach(), sampling, mask)) * share}
        out.update({k: float(v) * share for k, v in stats.items() if k != "ratio_max"})
        out["ratio_max"] = float(stats["ratio_max"]) * share
        return loss, out

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ----- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "updates": self.updates, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates, self.nonfinite_total = int(state["updates"]), int(state["nonfinite_total"])


def pack_micro_batches(batch: RolloutBatch, token_budget: int) -> Iterator[tuple[slice, RolloutBatch]]:
    """Consecutive rows packed while rows x padded length stays within `token_budget` (at least one row)."""
    lengths = batch.sequence_lengths.tolist()
    start = 0
    while start < len(lengths):
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and max(longest, lengths[end]) * (end - start + 1) <= token_budget:
            longest = max(longest, lengths[end])
            end += 1
        yield slice(start, end), batch.select(list(range(start, end)))
        start = end


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
