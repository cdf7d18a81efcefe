"""The `swarm:` job key: off by default, strict, and clear errors for what cannot work."""

import pytest

from rl.config import load_job
from rl.errors import UserError


def test_swarm_is_off_by_default_and_the_sapo_job_turns_it_on():
    assert load_job("tiny").swarm is None
    job = load_job("sapo")
    assert (job.swarm.local, job.swarm.external, job.swarm.transport.name) == (4, 4, "memory")


@pytest.mark.parametrize("override, words", [
    ("swarm={local: 3, external: 1}", ["swarm.local=3", "prompts_per_step=2"]),
    ("swarm={local: 0, external: 0}", ["swarm.local + swarm.external"]),
    ("swarm={local: 1, external: 1, node_id: 'a b'}", ["swarm.node_id"]),
    ("swarm={local: 1, external: 1, transport: {name: zmq}}", ["swarm.transport", "zmq"]),
    ("swarm={local: 1, external: 1, transport: {name: http, urll: x}}", ["urll", "did you mean 'url'"]),
])
def test_bad_swarm_settings_name_the_key(override, words):
    with pytest.raises(UserError) as info:
        load_job("tiny", [override])
    assert all(w in str(info.value) for w in words), str(info.value)


def test_transport_settings_are_typed():
    job = load_job("tiny", ["swarm={local: 2, external: 6, transport: {name: http, url: 'http://hub:9000'}}"])
    assert job.swarm.transport.url == "http://hub:9000" and job.swarm.transport.timeout_s == 2.0
    job = load_job("tiny", ["swarm={local: 2, external: 2, transport: {name: ray, exchange: mine}}"])
    assert job.swarm.transport.exchange == "mine"
