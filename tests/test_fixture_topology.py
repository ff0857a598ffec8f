"""The ``topology`` fixture and ``topologies`` marker (tests/topology.py): one test
runs on standalone, Cluster and Sentinel, ``redis_url`` follows the topology, fault
operations work on each, and the session's topology is healthy again after a test."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from redisproc import RedisProcess
from topology import TOPOLOGIES, MakeTopology, Topology, TopologyName, selected

ALL = pytest.mark.topologies(*TOPOLOGIES)


@ALL
def test_each_topology_has_its_url_form(
    topology: Topology, redis_url: str, request: pytest.FixtureRequest
) -> None:
    assert topology.name == request.node.callspec.params["topology"]
    assert redis_url == topology.url
    scheme = "rediss" if topology.tls else "redis"
    prefix = {
        "standalone": f"{scheme}://127.0.0.1:",
        "cluster": f"{scheme}+cluster://127.0.0.1:",
        "sentinel": f"{scheme}+sentinel://127.0.0.1:",
    }[topology.name]
    assert topology.url.startswith(prefix)
    if topology.name == "sentinel":
        assert "/mymaster/0" in topology.url
    assert topology.healthy()


@ALL
async def test_clients_read_and_write_on_every_topology(topology: Topology, namespace: str) -> None:
    async with topology.connect() as client:
        for i in range(20):
            await client.set(f"{namespace}:{i}", i)
        assert [await client.get(f"{namespace}:{i}") for i in range(20)] == [
            str(i) for i in range(20)
        ]
    masters = topology.master_pids()
    assert masters
    assert set(masters.values()) <= set(topology.pids().values())


@ALL
async def test_a_killed_master_is_replaced_and_the_topology_heals(
    topology: Topology, namespace: str
) -> None:
    key = f"{namespace}:survivor"
    async with topology.connect() as client:
        await client.set(key, "1")
        killed = topology.kill_master(key=key)
        assert isinstance(killed, RedisProcess)
        assert not killed.running
        assert not topology.healthy()
    topology.wait_failover(killed)
    # A fresh client: how an old one copes with the failover is the product's business.
    async with topology.connect() as client:
        await client.set(f"{namespace}:after", "2")
        assert await client.get(f"{namespace}:after") == "2"
    topology.heal()
    assert topology.healthy()
    assert killed.running


@pytest.mark.topologies("standalone")
def test_a_marker_may_choose_fewer_topologies(topology: Topology) -> None:
    assert topology.name == "standalone"


def test_without_marker_the_topology_is_standalone(topology: Topology) -> None:
    assert topology.name == "standalone"


def test_test_topologies_narrows_every_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_TOPOLOGIES", raising=False)
    assert selected(TOPOLOGIES) == list(TOPOLOGIES)
    monkeypatch.setenv("TEST_TOPOLOGIES", "sentinel, standalone")
    assert selected(TOPOLOGIES) == ["standalone", "sentinel"]
    assert selected(("cluster",)) == []
    with pytest.raises(pytest.UsageError, match="unknown topology"):
        selected(("mongo",))


def test_plain_tests_keep_the_session_server(redis_url: str, redis_server: RedisProcess) -> None:
    assert redis_url == redis_server.url


@pytest.mark.parametrize("name", ["cluster", "sentinel"])
async def test_a_private_topology_heals_after_every_process_died(
    make_topology: MakeTopology, name: TopologyName
) -> None:
    private = make_topology(name, appendfsync="always")
    assert private.options.appendfsync == "always"
    for pid in private.pids().values():
        os.kill(pid, signal.SIGKILL)
    assert not private.healthy()
    await anyio.to_thread.run_sync(private.heal)
    assert private.healthy(), private.describe()
    async with private.connect() as client:
        await client.set("again", "2")
        assert await client.get("again") == "2"
