"""rlpost benchmarks: performance scripts (`benchmarks.perf`) and method experiments (`benchmarks.methods`),
run from the repository root as `python -m benchmarks.perf.NAME` / `python -m benchmarks.methods.NAME`."""
