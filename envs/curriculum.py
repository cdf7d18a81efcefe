"""PCL — Prompt Curriculum Learning (Gao et al., arXiv 2510.01135): pick the prompts of intermediate difficulty.

The paper's loop, per step t (m = prompts_per_step, k = pool_factor, tau = target):

    pool   = k*m prompts drawn uniformly                     (rl/loop/sampler.py: CurriculumSampler)
    keep   = the m with |V(x) - tau| smallest                (select_closest)
    rollout + policy update on the kept prompts               (the usual step)
    V     <- MSE(V(x_i), mean_j r_ij) on the kept prompts     (PCLValueModel.update: on-policy targets)

Why 0.5: for a 0/1 reward with success probability p, a group has non-zero reward variance (so non-zero
group-relative advantages) with probability 1 - p^n - (1-p)^n and its expected squared advantage grows with
p(1-p); both peak at p = 0.5.

Departure from the paper, for a CPU: the paper's value model is a whole LM (same size as or smaller than the
policy) with a scalar head, fine-tuned end to end. Here the backbone is a *frozen* copy of a causal LM (by
default the policy's own base weights) and only an MLP head is trained. Frozen features depend only on the
prompt: scoring a pool costs one batched forward of the backbone over the pool's prompts (no generation, no
LM head) plus a tiny MLP, and the update reuses those features, so it costs milliseconds.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rl.batch import RolloutBatch
from rl.registries import CURRICULA
from rl.types import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rl.config.curriculum import PCLCurriculum

FEATURE_BATCH = 32  # prompts per backbone forward when scoring a pool


def select_closest(pred: torch.Tensor, target: float, count: int) -> list[int]:
    """Indices of the `count` predictions closest to `target`, closest first; ties go to the earlier index
    (stable sort), so selection is deterministic. pred: [P]. Never fewer than `count` (if P >= count)."""
    distance = (pred.double() - target).abs()                      # [P]
    return torch.sort(distance, stable=True).indices[:count].tolist()


def group_mean_rewards(batch: RolloutBatch) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """(prompt token ids, mean reward) per group: the value model's regression targets (Y_i = mean_j r_ij)."""
    assert batch.rewards is not None, "score the batch before updating the value model"
    keys, means = [], []
    for start, end in batch.group_bounds():
        length = int(batch.prompt_lengths[start])
        keys.append(tuple(batch.input_ids[start, :length].tolist()))
        means.append(batch.rewards[start:end].double().mean())
    return keys, torch.stack(means).float() if means else torch.zeros(0)


class PromptFeatures:
    """Frozen causal-LM prompt features ([H] per prompt), computed for a whole pool in padded batches.

    A pool is always computed afresh and its features kept only until the pool after next (the update of step n
    may come after the selection of step n+1 in async mode): batched float results can differ in the last bit
    with batch composition, so this makes selection depend only on the pool itself, which a resumed run draws
    identically. Prompts repeat across pools only across epochs, so a longer-lived cache would save little."""

    def __init__(self, model: PreTrainedModel, pooling: str, layer: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.backbone = getattr(model, model.base_model_prefix)  # the decoder stack, without the LM head
        self.pooling, self.layer = pooling, layer
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._pools: collections.deque[list[tuple[int, ...]]] = collections.deque(maxlen=2)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _batch(self, prompts: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """[P, H] for P prompts: right-padded (causal attention: real positions never see the padding)."""
        lengths = torch.tensor([len(ids) for ids in prompts])                                  # [P]
        x = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)                    # [P, L]
        for i, ids in enumerate(prompts):
            x[i, : len(ids)] = torch.tensor(ids)
        mask = torch.arange(x.shape[1]) < lengths[:, None]                                     # [P, L]
        out = self.backbone(input_ids=x.to(self.model.device), attention_mask=mask.long().to(self.model.device),
                            output_hidden_states=self.layer != -1)
        h = (out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]).float().cpu()  # [P, L, H]
        if self.pooling == "last":
            return h[torch.arange(len(prompts)), lengths - 1]                                  # [P, H]
        return (h * mask[..., None]).sum(1) / lengths[:, None]                                 # [P, H]

    def __call__(self, prompts: Sequence[tuple[int, ...]], new_pool: bool = False) -> torch.Tensor:
        """[P, H] features of P prompts (token-id tuples). `new_pool`: these are a new candidate pool (older
        pools' features beyond the previous one are dropped)."""
        # A new pool is always computed afresh, so selection never depends on what an earlier pool held.
        missing = [ids for ids in dict.fromkeys(prompts) if new_pool or ids not in self._cache]
        for start in range(0, len(missing), FEATURE_BATCH):
            chunk = missing[start : start + FEATURE_BATCH]
            self._cache.update(zip(chunk, self._batch(chunk)))
        if new_pool:
            self._pools.append(list(prompts))
            keep = {ids for pool in self._pools for ids in pool}
            self._cache = {ids: f for ids, f in self._cache.items() if ids in keep}
        return torch.stack([self._cache[ids] for ids in prompts]) if prompts else torch.zeros(0, self.width)


class ValueHead(torch.nn.Module):
    """features [P, H] -> predicted mean reward [P]: per-dimension standardisation with running statistics of
    the prompts trained on, a one-hidden-layer MLP, and an optional sigmoid (0/1 rewards).

    Why standardise: an LM's prompt features share a large common component (the chat template) and a few
    huge dimensions; what tells prompts apart is a small residual that a plain MLP on raw features learns
    slowly. The statistics are buffers, so they are checkpointed with the weights."""

    feature_mean: torch.Tensor   # [H] float64 (buffer)
    feature_m2: torch.Tensor     # [H] float64 (buffer): sum of squared deviations
    feature_count: torch.Tensor  # [] float64 (buffer)

    def __init__(self, width: int, hidden: int, squash: str, seed: int) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the head's init depends on the job seed only, not on what ran before
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
        torch.random.set_rng_state(gen_state)
        self.squash = squash
        self.register_buffer("feature_mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("feature_m2", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("feature_count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def observe(self, features: torch.Tensor) -> None:
        """Merge a batch [B, H] into the running mean/variance (Chan et al.'s parallel Welford update)."""
        x = features.double()
        n, mean = float(x.shape[0]), x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        total = self.feature_count + n
        delta = mean - self.feature_mean
        self.feature_mean += delta * n / total
        self.feature_m2 += m2 + delta**2 * self.feature_count * n / total
        self.feature_count.copy_(total)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.feature_count > 1:
            std = (self.feature_m2 / (self.feature_count - 1)).sqrt().clamp_min(1e-4)
            features = ((features.double() - self.feature_mean) / std).float()               # [P, H]
        out = self.net(features).squeeze(-1)                                                  # [P]
        return torch.sigmoid(out) if self.squash == "sigmoid" else out


@CURRICULA.register("pcl")
class PCLValueModel:
    """The PCL value model V(x) ~ E_{y~pi_t}[r(x, y)]: `select` picks prompts, `update` learns from a scored batch.

    Thread-safe: in async mode the next step's selection runs in the rollout thread while this step updates.
    """

    def __init__(self, cfg: PCLCurriculum, model_dir: str, dtype: str, seed: int) -> None:
        from rl.models import load_causal_lm, resolve_model

        backbone_dir = model_dir if cfg.model is None else resolve_model(cfg.model)
        self.cfg = cfg
        self.features = PromptFeatures(load_causal_lm(backbone_dir, dtype, "cpu"), cfg.pooling, cfg.layer)
        self.head = ValueHead(self.features.width, cfg.hidden, cfg.squash, seed)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.lr)
        self.updates = 0
        self._lock = threading.Lock()

    def predict(self, prompts: Sequence[tuple[int, ...]], new_pool: bool = False) -> torch.Tensor:
        """[P] predicted mean reward of each prompt (token-id tuples) under the current policy."""
        feats = self.features(prompts, new_pool)
        with self._lock, torch.no_grad():
            return self.head(feats)

    def select(self, pool: Sequence[Prompt], count: int) -> tuple[list[Prompt], dict[str, float]]:
        """The `count` prompts of `pool` (rl.types.Prompt) whose prediction is closest to the target."""
        start = time.perf_counter()
        pred = self.predict([tuple(p.token_ids) for p in pool], new_pool=True)                # [P]
        chosen = select_closest(pred, self.cfg.target, count)
        picked = pred[chosen]
        return [pool[i] for i in chosen], {
            "curriculum/select_seconds": time.perf_counter() - start,
            "curriculum/pool_size": float(len(pool)),
            "curriculum/pool_pred_mean": float(pred.mean()),
            "curriculum/pool_pred_std": float(pred.std()) if len(pool) > 1 else 0.0,
            "curriculum/selected_pred_mean": float(picked.mean()),
            "curriculum/selected_distance_mean": float((picked - self.cfg.target).abs().mean()),
        }

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """MSE regression of V on the mean group reward of the prompts just rolled out (on-policy targets).
        `curriculum/value_mse` is measured before the update: the error on prompts V had not yet learned from."""
        start = time.perf_counter()
        keys, targets = group_mean_rewards(batch)
        if not keys:
            return {}
        feats = self.features(keys)                                                           # [G, H]
        with self._lock:
            with torch.no_grad():
                before = float(((self.head(feats) - targets) ** 2).mean())  # the error V made on these prompts
            self.head.observe(feats)
            for _ in range(self.cfg.updates_per_step):
                loss = ((self.head(feats) - targets) ** 2).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                after = float(((self.head(feats) - targets) ** 2).mean())
            self.updates += 1
        return {"curriculum/value_mse": before, "curriculum/value_mse_after_update": after,
                "curriculum/target_mean": float(targets.mean()),
                "curriculum/update_seconds": time.perf_counter() - start}

    def state_dict(self) -> dict[str, object]:
        """Head weights, optimizer moments and the update count; the frozen backbone is rebuilt from its files."""
        with self._lock:
            return {"head": {k: v.clone() for k, v in self.head.state_dict().items()},
                    "optimizer": copy.deepcopy(self.optimizer.state_dict()), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # a checkpoint's state (torch tensors, dicts)
        with self._lock:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.updates = int(state["updates"])
