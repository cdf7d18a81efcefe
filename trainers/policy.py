"""The policy trainer: turns a scored `RolloutBatch` into optimizer steps. It never generates.

Per rollout batch (`step`):
    1. reference logprobs, if the KL coefficient is > 0 (no reference exists otherwise);
    2. split into `mini_batches` shards of whole groups; `old` logprobs of every shard once, without
       grad, before any update (pi_old = the policy that sampled, as the learner computes it). With a
       single optimizer step (1 epoch x 1 mini-batch) they are the training forward's own detached
       values instead, which are identical and save a forward pass (ALGORITHMS.md §1.5);
    3. `ppo_epochs` passes of `mini_batches` optimizer steps; each accumulates the gradient over
       micro-batches packed by `micro_batch_tokens`, with aggregation normalisers counted over the
       whole mini-batch, so the update does not depend on the packing (ALGORITHMS.md §1.3);
    4. clip the gradient norm; a non-finite loss or gradient skips the update (counted in
       `train/skipped_nonfinite`), and `max_nonfinite_steps` in a row stop the run.
Per-token loss = objective x truncated importance weight (sampler mismatch) + beta x KL estimate.

With N learner ranks (trainers/sharding.py) every rank holds the same batch and trains its own whole groups of
each mini-batch; the normalisers are summed over the ranks, FSDP2 sums the gradients, and the metrics are reduced,
so N ranks make the update one rank makes on the same batch (up to float reduction order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from rl.batch import RolloutBatch
from rl.config.algorithm import ConstantNorm
from rl.errors import UserError
from rl.registries import AGGREGATIONS, LOSSES
from rl.types import LossContext, Objective
from trainers.aggregation import Normalisers
from trainers.logprobs import token_logprobs
from trainers.losses import kl_penalty, masked_mean, mismatch_kl, mismatch_weights
from trainers.microbatch import group_micro_batches, micro_batches, no_grad_logprobs
from trainers.prefix_grouper import check_supported, shared_prefix_logprobs
from trainers.reference import ReferencePolicy, default_reference
from trainers.schedule import build_optimizer
from trainers.sharding import Lockstep, RankGroup, Root

if TYPE_CHECKING:
    from rl.config.algorithm import AlgorithmConfig, GRPOMAAlgorithm
    from rl.config.job import TrainerConfig
    from trainers.adapters.core import AdapterSchedule

    AnyAlgorithm = AlgorithmConfig | GRPOMAAlgorithm


class NonFiniteError(UserError):
    """Repeated non-finite losses or gradients: stop rather than write NaN weights."""


class PolicyTrainer:
    """AdamW on a (possibly adapter-wrapped) causal LM with a GRPO-family objective.

    model: an nn.Module causal LM (maybe PEFT-wrapped); algorithm: `AlgorithmConfig` (or GRPO-MA's) as a
    validated job has it: correction level and the `constant` aggregation's length resolved (`auto` depends on
    where the sampler runs, C on rollout.max_new_tokens, which only the job knows); trainer: `TrainerConfig`;
    temperature: the rollout's sampling temperature (logprobs are taken at it); device: where the model lives;
    adapter_schedule: an `AdapterSchedule` or None; reference: overrides the default reference policy (used
    only when algorithm.kl.coef > 0); root: the FSDP2 root unit of a sharded `model` (trainers/sharding.py) and
    group its learner group, both None on one rank.
    """

    def __init__(self, model: torch.nn.Module, algorithm: AnyAlgorithm, trainer: TrainerConfig, temperature: float,
                 device: str, adapter_schedule: AdapterSchedule | None = None,
                 reference: ReferencePolicy | None = None, root: Root | None = None,
                 group: RankGroup | None = None) -> None:
        self.model, self.algo, self.cfg, self.device = model, algorithm, trainer, device
        self.group = group or RankGroup()
        self.root = root or Root(model)  # every pass through the policy goes through it (sharded or not)
        self.lockstep = Lockstep(self.root, self.group, self._dummy_pass)
        self.temperature = temperature
        self.objective: Objective = LOSSES.entry_for(algorithm.loss)
        self.aggregate: Callable[..., torch.Tensor] = AGGREGATIONS.get(algorithm.aggregation.name)
        self.constant_length = _constant_length(algorithm)
        if algorithm.correction.level == "auto":
            raise ValueError("algorithm.correction.level 'auto' reached the trainer unresolved; validate the job "
                             "(JobConfig resolves it from trainer.mode, cluster and rollout.backend) or pass "
                             "none, token or sequence")
        self.correction = algorithm.correction.level
        self.reference: ReferencePolicy | None = None
        if algorithm.kl.coef > 0:  # built before any update: a frozen copy must hold the initial weights
            self.reference = reference or default_reference(model, self._batch_logprobs)
        total_updates = trainer.max_steps * trainer.ppo_epochs * trainer.mini_batches
        self.optimizer, self.scheduler = build_optimizer(self.trainable_named_parameters(), trainer, total_updates)
        self.adapter_schedule = adapter_schedule
        self.updates = 0
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        if trainer.shared_prefix:  # fail before any rollout, not at the first forward
            check_supported(model)
        if trainer.gradient_checkpointing:
            # torch types module attributes as Tensor | Module; an HF model (PEFT forwards it) has this method
            model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False})

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every parameter the optimizer updates (the adapter's only, with one)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ----- one rollout batch -------------------------------------------------------------------
    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """`ppo_epochs` x `mini_batches` optimizer updates on `batch` (advantages set); mean metrics."""
        if batch.advantages is None:
            raise ValueError("PolicyTrainer.step needs a batch with advantages (batch.with_advantages)")
        start = time.perf_counter()
        self.model.train()  # HF gradient checkpointing is active only in train mode
        minis = batch.split_by_groups(self.cfg.mini_batches)
        single = self.cfg.ppo_epochs * len(minis) == 1 or not self.objective.needs_old_logprobs(self.algo.loss)
        shares = [self.group.share(m) for m in minis]  # this rank's groups of each mini-batch (all on one rank)
        norms = self._normalisers(shares)  # counted over every rank's share: the whole mini-batch's
        with self.lockstep.phase(backward=False):
            shares = [self._with_reference(s) for s in shares]
        with self.lockstep.phase(backward=False):
            olds = [None if single or s is None else self._batch_logprobs(self.model, s) for s in shares]
        with self.lockstep.phase(backward=False):
            extras = [{} if s is None else self._loss_inputs(s) for s in shares]  # like `olds`: before any update
        logprobs_s = time.perf_counter() - start  # no-grad passes: reference, behaviour, objective inputs
        updates = [self._update(share, norm, old, extra) for _ in range(self.cfg.ppo_epochs)
                   for share, norm, old, extra in zip(shares, norms, olds, extras)]
        metrics = summarise(updates)
        tokens = float(batch.loss_mask.sum())  # trained (loss-mask) tokens, each once per epoch
        metrics.update({"time/logprobs_s": logprobs_s, "time/update_s": time.perf_counter() - start - logprobs_s,
                        "train/tokens": tokens, "train/tokens_per_s": tokens / (time.perf_counter() - start),
                        "train/skipped_nonfinite": float(self.nonfinite_total), "train/updates": float(self.updates)})
        return metrics

    def _normalisers(self, shares: list[RolloutBatch | None]) -> list[Normalisers]:
        """Each mini-batch's global counts: its shares' loss tokens and sequences summed over the ranks."""
        counts: list[float] = []
        for share in shares:
            counts += [0.0, 0.0] if share is None else [float(share.loss_mask.sum()), float(share.loss_mask.shape[0])]
        total = self.group.sum(counts)
        return [Normalisers(tokens=total[2 * i], sequences=total[2 * i + 1], constant_length=self.constant_length)
                for i in range(len(shares))]

    def _with_reference(self, share: RolloutBatch | None) -> RolloutBatch | None:
        if self.reference is None or share is None:
            return share
        return share.with_ref_logprobs(self.reference.logprobs(share))

    def _forward(self, model: torch.nn.Module, batch: RolloutBatch,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [n, t], entropy [n, t]) of `batch`'s loss tokens under `model`, on the trainer's device."""
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731

        def compute(policy: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            if self.cfg.shared_prefix:  # Prefix Grouper: each group's prompt encoded once (ALGORITHMS.md §4)
                return shared_prefix_logprobs(
                    policy, to(batch.input_ids), to(batch.attention_mask), to(batch.loss_mask), batch.prompt_lengths,
                    batch.group_ids, self.temperature, self.cfg.logprob_chunk_tokens, with_entropy)
            return token_logprobs(policy, to(batch.input_ids), to(batch.attention_mask), to(batch.loss_mask),
                                  self.temperature, self.cfg.logprob_chunk_tokens, with_entropy)

        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") else nullcontext()
        with autocast:  # the policy through its root unit (FSDP2 gathers there); a frozen reference copy directly
            return self.root(compute) if model is self.model else compute(model)

    def _dummy_pass(self, backward: bool) -> None:
        """A pass that changes nothing (one loss token, zero loss) to keep this rank's collectives paired with
        the other ranks' (trainers/sharding.py, Lockstep)."""
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        mask = torch.tensor([[False, True]], device=self.device)
        with torch.set_grad_enabled(backward):
            logp, _ = self.root(lambda policy: token_logprobs(policy, ids, torch.ones_like(ids), mask))
            if backward:
                (logp.sum() * 0.0).backward()

    def _loss_inputs(self, mini: RolloutBatch) -> Mapping[str, torch.Tensor]:
        """Row-aligned extra inputs ([n] or [n, T]) an objective asks for through its `prepare(ctx, mini, cfg)`
        hook (Lp-Reg's proxy log-probs, RAPID's rewards); none for the others."""
        prepare = self.objective.prepare
        return {} if prepare is None else prepare(self._loss_context(), mini, self.algo.loss)

    def _loss_context(self) -> LossContext:
        return LossContext(model=self.model, device=self.device, temperature=self.temperature,
                           micro_batch_tokens=self.cfg.micro_batch_tokens,
                           logprob_chunk_tokens=self.cfg.logprob_chunk_tokens, run=self.root)

    def _batch_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """[N, T] CPU logprobs under `model`, no grad, micro-batch by micro-batch."""
        return no_grad_logprobs(lambda micro: self._forward(model, micro, False)[0], batch,
                                self.cfg.micro_batch_tokens, self.cfg.shared_prefix)

    # ----- one optimizer update ----------------------------------------------------------------
    def _micro_batches(self, mini: RolloutBatch) -> list[tuple[list[int], RolloutBatch]]:
        # Shared-prefix packing already keeps whole groups, which also serves group-level losses (RAPID).
        if self.cfg.shared_prefix or not self.objective.needs_whole_groups:
            return micro_batches(mini, self.cfg.micro_batch_tokens, self.cfg.shared_prefix)
        return group_micro_batches(mini, self.cfg.micro_batch_tokens)

    def _update(self, mini: RolloutBatch | None, norm: Normalisers, old: torch.Tensor | None,
                extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer update on this rank's share `mini` (None: no rows here) of a mini-batch whose global
        counts are `norm`."""
        self.optimizer.zero_grad(set_to_none=True)
        tally: dict[str, float] = {}
        finite = True
        with self.lockstep.phase(backward=True):
            for rows, micro in [] if mini is None else self._micro_batches(mini):
                micro_old = None if old is None else old[torch.tensor(rows), : micro.seq_len]
                micro_extra = {k: slice_rows(v, rows, micro.seq_len) for k, v in (extra or {}).items()}
                loss, stats = self._micro_loss(micro, norm, micro_old, micro_extra)
                finite = finite and bool(torch.isfinite(loss))
                if not finite and not self.group.sharded:
                    return self._skip()
                # FSDP2 averages gradients over the ranks; the loss is already a share of the global one: sum
                (loss * self.group.size).backward()  # a non-finite loss still runs (its passes pair up), then skips
                accumulate(tally, stats)
        if self.group.max(0.0 if finite else 1.0) > 0:
            return self._skip()
        tally = self._reduced(tally)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params(), self.cfg.max_grad_norm)  # over all ranks' shards
        if not bool(torch.isfinite(grad_norm)):
            return self._skip()
        if self.adapter_schedule is not None:
            self.adapter_schedule.before_optimizer_step(self.model, self.updates)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this update uses
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1
        self.nonfinite_streak = 0
        return {**tally, "grad_norm": float(grad_norm), "lr": lr}

    def _reduced(self, tally: dict[str, float]) -> dict[str, float]:
        """This update's metrics over all ranks: token-share-weighted sums add up, maxima stay maxima."""
        if not self.group.sharded:
            return tally
        merged: dict[str, float] = {}
        for part in self.group.gather(tally):
            accumulate(merged, part)
        return merged

    def _skip(self) -> dict[str, float]:
        """Drop this update's gradient and its partial metrics; count it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive updates had a non-finite loss or gradient; stopping before "
                "NaN reaches the weights. Lower trainer.lr, check rewards for extreme values, or use "
                "model.dtype=float32. The last checkpoint is intact: resume after changing the job.")
        return {"grad_norm": math.nan, "lr": float(self.optimizer.param_groups[0]["lr"])}

    def _micro_loss(self, micro: RolloutBatch, norm: Normalisers, old: torch.Tensor | None,
                    extra: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(this micro-batch's share of the mini-batch loss, its metric contributions)."""
        logp, entropy = self._forward(self.model, micro, with_entropy=True)  # [b, t] each
        dev = lambda t: t.to(self.device)  # noqa: E731
        mask = dev(micro.loss_mask).float()  # [b, t]
        old = logp.detach() if old is None else dev(old)  # [b, t]
        adv = dev(micro.advantages)
        adv = adv.unsqueeze(1).expand_as(logp) if adv.dim() == 1 else adv  # [b, t]
        extra = {k: dev(v) for k, v in (extra or {}).items()}
        per_token, stats = self.objective.fn(logp, old, adv, mask, self.algo.loss, **extra)  # [b, t]
        sampling = dev(micro.sampling_logprobs)  # [b, t]
        tis = mismatch_weights(old, sampling, mask, self.correction, self.algo.correction.cap)  # [b, t]
        per_token = per_token * tis
        kl = torch.zeros_like(logp)
        if self.reference is not None:
            kl = kl_penalty(logp, dev(micro.ref_logprobs), self.algo.kl.estimator)  # [b, t]
            per_token = per_token + self.algo.kl.coef * kl
        loss = self.aggregate(per_token, mask, norm, self.algo.aggregation)
        share = float(mask.sum()) / max(norm.tokens, 1.0)  # token share: sums of metrics are mini-batch means
        out = {"loss": float(loss.detach()), "kl": float(masked_mean(kl.detach(), mask)) * share,
               "policy/entropy": float(masked_mean(entropy, mask)) * share,
               "policy/mismatch_kl": float(mismatch_kl(old, sampling, mask)) * share,
               "policy/tis_weight_mean": float(masked_mean(tis, mask)) * share}
        out.update({k: float(v) * share for k, v in stats.items() if k not in MAX_METRICS})
        out.update({k: float(stats[k]) for k in MAX_METRICS if k in stats})  # a user loss may report none
        return loss, out

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ----- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Optimizer, schedule and counters; with the model's weights, enough for a bit-exact resume."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "updates": self.updates, "nonfinite_total": self.nonfinite_total,
                "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # torch's free-form optimizer/scheduler state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates, self.nonfinite_total = int(state["updates"]), int(state["nonfinite_total"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))


def _constant_length(algorithm: AnyAlgorithm) -> float:
    """The `constant` aggregation's C, resolved at validation (rl/config/job.py); 0 for the others (unused)."""
    aggregation = algorithm.aggregation
    if not isinstance(aggregation, ConstantNorm):
        return 0.0
    if aggregation.max_length is None:
        raise ValueError("algorithm.aggregation.max_length reached the trainer unresolved; validate the job "
                         "(JobConfig sets it to rollout.max_new_tokens) or pass a length")
    return float(aggregation.max_length)


def slice_rows(values: torch.Tensor, rows: list[int], seq_len: int) -> torch.Tensor:
    """A micro-batch's part of a row-aligned tensor: [n] -> [b], [n, T] -> [b, seq_len]."""
    picked = values[torch.tensor(rows)]
    return picked[:, :seq_len] if picked.dim() == 2 else picked


MAX_METRICS = ("ratio_max",)


def accumulate(tally: dict[str, float], stats: dict[str, float]) -> None:
    """Add a micro-batch's (share-weighted) metrics into the update's; maxima stay maxima."""
    for k, v in stats.items():
        tally[k] = max(tally.get(k, -math.inf), v) if k in MAX_METRICS else tally.get(k, 0.0) + v


def summarise(updates: list[dict[str, float]]) -> dict[str, float]:
    """Per-update metrics -> per-step: means over updates (NaN entries of skipped ones left out),
    maxima for MAX_METRICS; a metric no update produced is NaN."""
    keys = {k for u in updates for k in u}
    out: dict[str, float] = {}
    for k in sorted(keys):
        values = [u[k] for u in updates if k in u and not math.isnan(u[k])]
        reduce = max if k in MAX_METRICS else (lambda v: sum(v) / len(v))
        out[k] = reduce(values) if values else math.nan
    return out
