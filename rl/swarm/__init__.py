"""SAPO — Swarm sAmpling Policy Optimization (Gensyn, arXiv 2509.08721; gensyn-ai/rl-swarm, gensyn-ai/genrl).

A swarm of independent nodes, each with its own policy (models may differ), rollouts and learner.
Every step a node publishes its decoded rollouts (question + group of completion texts + answer
metadata) and trains on I local + J external rollouts (`swarm: {local: I, external: J}`).

    exchange.py      the wire format (one rollout = one question with its group of completions)
    validation.py    strict parsing of untrusted peer messages; rejections are counted by reason
    pool.py          de-duplicated, bounded, expiring store of external rollouts, each used once
    mixing.py        re-tokenisation with the receiver's template/tokenizer; I local + J external
    node.py          the per-step exchange the driver calls (publish, collect, mix, logprobs)
    transports.py    memory (one process) and http (processes/machines) transports; hub.py the hub
    ray_transport.py nodes on one Ray cluster through a named exchange actor
    launcher.py      `rl swarm JOB --nodes N` (lock-step in one process, processes + hub, or Ray actors)

Choices where the paper leaves room (ALGORITHMS.md §9): a rollout is a whole group (rl-swarm's
"tree"), so advantages are computed within one source's completions; external rows are treated as
on-policy text (sampling logprobs := the receiver's own, ratio 1), as genrl does; rewards are always
recomputed by the receiver; external groups are drawn uniformly from the fresh pool, each used once.
"""
