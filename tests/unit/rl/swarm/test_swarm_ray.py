"""The Ray transport on a real local Ray cluster: a named exchange actor shared by nodes."""

import time
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    import os

    # at setup, not collection: the skip is then seen as a ray-marked test's, which fails under CI
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # a loaded CI machine starts raylets slowly
    ray.init(num_cpus=1, include_dashboard=False, namespace="rlpost-swarm-test", log_to_driver=False)
    yield
    ray.shutdown()


def cfg(name):
    return SimpleNamespace(name="ray", address=None, exchange=name, timeout_s=60.0)  # actor start on a busy host


def test_nodes_exchange_through_the_named_actor_and_survive_its_death(cluster):
    from rl.swarm.ray_transport import RayTransport, kill_exchange

    a, b = RayTransport(cfg("swarm-t")), RayTransport(cfg("swarm-t"))
    a.publish([b"one", b"two"])
    a.flush()
    assert b.receive() == [b"one", b"two"] and b.receive() == []
    late = RayTransport(cfg("swarm-t"))  # joins the same exchange and reads the backlog
    assert late.receive() == [b"one", b"two"]

    kill_exchange("swarm-t")  # the exchange dies: reads fail (counted), no hang, then it is re-created
    assert a.receive() == [] and b.receive() == [] and a.errors == b.errors == 1
    deadline = time.monotonic() + 60
    while not a._rejoin() and time.monotonic() < deadline:  # the dead actor's name is released
        time.sleep(0.5)
    a.publish([b"three"])
    a.flush()
    assert b.receive() == [b"three"]  # b joins the same new exchange


def test_a_different_exchange_name_is_a_different_swarm(cluster):
    from rl.swarm.ray_transport import RayTransport

    a, other = RayTransport(cfg("swarm-x")), RayTransport(cfg("swarm-y"))
    a.publish([b"m"])
    a.flush()
    assert other.receive() == []
    assert RayTransport(cfg("swarm-x")).receive() == [b"m"]
