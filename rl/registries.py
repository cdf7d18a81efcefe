"""The project's registries, one per plug-in family.

Each names the modules that hold its built-in entries; those are imported on first lookup only.
"""

from __future__ import annotations

from rl.registry import Registry

ROLLOUT_BACKENDS: Registry = Registry("rollout backend", ("rollout.hf_engine", "rollout.vllm_engine"))
ADVANTAGES: Registry = Registry("advantage", ("trainers.advantages",))
LOSSES: Registry = Registry("loss", ("trainers.losses", "trainers.lp_reg", "trainers.rapid"))
AGGREGATIONS: Registry = Registry("aggregation", ("trainers.aggregation",))
ADAPTERS: Registry = Registry("adapter", ("trainers.adapters",))
ENVS: Registry = Registry("env", ("envs.arithmetic", "envs.countdown", "envs.dataset"))
REWARDS: Registry = Registry("reward", ("rewards.builtin", "rewards.cot"))
CLUSTERS: Registry = Registry("cluster", ("rl.loop.cluster",))
SWARM_TRANSPORTS: Registry = Registry("swarm transport", ("rl.swarm.transports", "rl.swarm.ray_transport"))
CURRICULA: Registry = Registry("curriculum", ("envs.curriculum",))
ALGORITHMS: Registry = Registry("algorithm", ("rl.loop.algorithms",))
