"""The training loop: everything that imports the plug-in packages and wires them together.

rl/ has two layers. The contracts (rl.batch, rl.types, rl.errors, rl.registry, rl.registries, rl.models,
rl.plugins, rl.config) are imported by every package and import none of them. The loop (this package:
driver, steps, runtime, learner, worker, weights, cluster, sampler, algorithms, evaluation, checkpoint, metrics,
shutdown, standalone, and the swarm launcher / lock-step runner) builds a run from a job and imports the
packages it needs; rl/swarm/ is a stage the loop calls. Nothing outside rl/loop and rl/cli.py imports it.
"""
