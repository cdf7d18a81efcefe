"""The project's registries, one per plug-in family.

Each names the modules that hold its built-in entries; those are imported on first lookup only. Built-ins
register with `REGISTRY.register(name)`, as a decorator (`@ENVS.register("arithmetic")`) or applied to the entry
(`LOSSES.register("gspo")(Objective(gspo))`); a family with a config `custom` variant also knows
how to load and check user code named by `import_path` (tests/unit/rl/test_variants.py ties the config
variants to these names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rl.plugins import load_callable, load_object
from rl.registry import Registry
from rl.types import AdvantageFn, EnvFactory, Objective, RolloutEngine

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig


def custom_objective(import_path: str) -> Objective:
    """A user loss: an `Objective`, or a plain `fn(logp, old_logp, adv, mask, cfg)` (no inputs, no flags)."""
    obj = load_object(import_path, "custom loss")
    if isinstance(obj, Objective):
        return obj
    fn = load_callable(import_path, "custom loss", ("logp", "old_logp", "adv", "mask", "cfg"))
    return Objective(fn)  # type: ignore[arg-type]


def custom_advantage(import_path: str) -> AdvantageFn:
    return load_callable(import_path, "custom advantage", ("rewards", "group_ids", "cfg"))  # type: ignore[return-value]


def custom_env(import_path: str) -> EnvFactory:
    return load_callable(import_path, "custom env", ("cfg", "tokenizer", "seed"))  # type: ignore[return-value]


# Entries: engine factories `(rollout_cfg, model_dir=, dtype=, device=, seed=, model=, max_lora_rank=)`.
ROLLOUT_BACKENDS: Registry[Callable[..., RolloutEngine]] = Registry("rollout backend",
                                                                  ("rollout.hf_engine", "rollout.vllm_engine"))
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage", ("trainers.advantages",), custom=custom_advantage)
LOSSES: Registry[Objective] = Registry("loss", ("trainers.losses", "trainers.lp_reg", "trainers.rapid"),
                                       custom=custom_objective)
# Entries: `fn(loss [N, T], mask [N, T], normalisers, aggregation_cfg) -> scalar`.
AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("aggregation", ("trainers.aggregation",))
# Entries: `fn(its adapter section) -> PeftConfig` (each takes its own section class).
ADAPTERS: Registry[Callable[..., PeftConfig]] = Registry("adapter", ("trainers.adapters.core",))
ENVS: Registry[EnvFactory] = Registry("env", ("envs.arithmetic", "envs.countdown", "envs.dataset"), custom=custom_env)
# Entries: reward functions `fn(prompt, completion, **fields)` (the contract in rewards/__init__.py).
REWARDS: Registry[Callable[..., object]] = Registry(
    "reward", ("rewards.builtin", "rewards.code_exec", "rewards.reasoning", "rewards.cot"))
# Entries: `factory(its config section) -> rl.types.BatchReward` (rl/config/rewards.py: ServiceRewardConfig); a
# factory with `placeable = True` runs in its own Ray actor under `cluster: ray` (rl/loop/reward_actor.py).
REWARD_MODELS: Registry = Registry("reward model", ("rewards.reward_model", "rewards.judge"))
# Entries: tool factories `fn(tool_cfg) -> envs.tools.Tool` (multi-turn episodes, rl/config/agent.py).
TOOLS: Registry = Registry("tool", ("envs.tools",))
CLUSTERS: Registry = Registry("cluster", ("rl.loop.cluster",))
SWARM_TRANSPORTS: Registry = Registry("swarm transport", ("rl.swarm.transports", "rl.swarm.ray_transport"))
CURRICULA: Registry = Registry("curriculum", ("envs.curriculum",))
ALGORITHMS: Registry = Registry("algorithm", ("rl.loop.algorithms",))
