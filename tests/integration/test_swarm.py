"""SAPO swarms end to end on the tiny model: a node alone, lock-step nodes with a peer leaving, and
(slow) the multi-process launcher over the HTTP hub."""

import json

import pytest
from helpers import metrics, rl

from rl.config import load_job
from rl.loop.lockstep import run_lockstep

SWARM = {"local": 2, "external": 2, "transport": {"name": "memory", "board": "itest"}}


def test_a_node_alone_trains_and_logs_swarm_metrics(tmp_path):
    run = tmp_path / "alone"
    done = rl("train", "tiny", f"swarm={json.dumps(SWARM)}", "trainer.max_steps=2", f"run_dir={run}")
    assert done.returncode == 0, done.stderr
    rows = metrics(run)
    assert [r["swarm/local"] for r in rows] == [2, 2] and [r["swarm/external"] for r in rows] == [0, 0]
    assert all(r["swarm/published"] == 2 and r["swarm/external_shortfall"] == 2 for r in rows)


def test_lockstep_nodes_share_rollouts_and_go_on_when_a_peer_leaves(tmp_path):
    jobs = [load_job("tiny", [f"swarm={json.dumps({**SWARM, 'node_id': f'n{i}'})}", f"seed={i}",
                              "trainer.max_steps=3", "trainer.save_every_steps=0", "logging.progress=false",
                              "logging.wandb.mode=disabled", f"run_dir={tmp_path / f'n{i}'}"]) for i in range(2)]
    dirs = run_lockstep(jobs, leave_after={1: 1})  # n1 leaves the swarm after step 1
    n0, n1 = metrics(dirs[0]), metrics(dirs[1])
    assert [r["swarm/external"] for r in n0] == [2, 0, 0]  # n1's two groups of round 1, then nothing
    assert [r["swarm/local"] for r in n0] == [2, 2, 2] and n0[-1]["swarm/external_shortfall"] == 2
    assert n0[0]["swarm/peers"] == 1 and len(n1) == 1 and n1[0]["swarm/external"] == 2
    assert all(r["swarm/rejected"] == 0 for r in n0 + n1)


@pytest.mark.slow
def test_rl_swarm_runs_nodes_as_processes_through_an_http_hub(tmp_path):
    swarm = {**SWARM, "wait_s": 30, "transport": {"name": "http", "url": "http://127.0.0.1:0"}}
    done = rl("swarm", "tiny", f"swarm={json.dumps(swarm)}", "trainer.max_steps=2", f"run_dir={tmp_path}",
              "--nodes", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    for i in range(2):
        rows = metrics(tmp_path / f"node{i}")
        assert [r["swarm/external"] for r in rows] == [2, 2], rows
        assert rows[-1]["swarm/peers"] == 1 and rows[-1]["swarm/transport_errors"] == 0
