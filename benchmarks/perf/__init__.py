"""Performance benchmarks: generation, learner, step, adapters, Prefix Grouper, Infinite Sampling, rlpost vs TRL."""
