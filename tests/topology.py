"""One test, three deployments: standalone Redis, Redis Cluster and Sentinel.

Opt a test (or a module, with ``pytestmark``) in with a marker; it then runs once per
topology, and ``redis_url`` (so ``make_runner``, ``subprocess_env`` ...) points at it:

    @pytest.mark.topologies("standalone", "cluster", "sentinel")
    async def test_x(make_runner, topology: Topology) -> None:
        ...
        killed = topology.kill_master(key="some-key")   # SIGKILL (cluster: that key's master)
        topology.wait_failover(killed)                  # standalone: restarts it instead

A test that asks for ``topology`` without the marker runs on "standalone" only.
``TEST_TOPOLOGIES=standalone,cluster`` narrows every marker (local runs, CI splits);
``TEST_REDIS_SERVER`` picks the binary; ``TEST_TOPOLOGY_TLS=1`` serves every topology
over TLS (skipped where the binary lacks TLS).

Servers are session-scoped: each topology starts once per xdist worker, on first use,
and tests isolate by namespace. After each test ``heal()`` restarts what the test
killed and waits until the topology is healthy again (if that fails it is rebuilt on
new ports). ``make_topology`` builds a private one (e.g. with ``appendfsync always``)
that lives for one test.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import pytest
import redis.asyncio
from clusterproc import LocalCluster
from polling import NotReadyError, poll_until
from redisbin import RedisBinary, binary_at, default_binary
from redisproc import RedisProcess, RedisProcessError, ping
from sentinelproc import LocalSentinel
from tlsfiles import TLSFiles, make_tls_files

TopologyName = Literal["standalone", "cluster", "sentinel"]
TOPOLOGIES: tuple[TopologyName, ...] = get_args(TopologyName)
AnyRedis = redis.asyncio.Redis | redis.asyncio.RedisCluster
MARKER = "topologies"


@dataclass(frozen=True)
class TopologyOptions:
    """How to build a topology; the session ones read theirs from the environment."""

    binary: str | None = None
    tls: bool = False
    appendonly: bool = True
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    timeout: float = 60.0

    @classmethod
    def from_env(cls) -> TopologyOptions:
        fsync = os.environ.get("TEST_TOPOLOGY_APPENDFSYNC", "everysec")
        if fsync not in ("always", "everysec", "no"):
            raise ValueError(f"TEST_TOPOLOGY_APPENDFSYNC={fsync!r}")
        return cls(
            binary=os.environ.get("TEST_REDIS_SERVER") or None,
            tls=os.environ.get("TEST_TOPOLOGY_TLS", "") not in ("", "0"),
            appendfsync=cast(Literal["always", "everysec", "no"], fsync),
        )

    def redis_binary(self) -> RedisBinary:
        return binary_at(self.binary) if self.binary else default_binary()


class Topology(abc.ABC):
    """A running deployment with its URL and fault operations (all blocking: from an
    async test call the slow ones through ``anyio.to_thread.run_sync``)."""

    name: TopologyName

    def __init__(self, directory: Path, options: TopologyOptions) -> None:
        self.directory = directory
        self.options = options
        self.binary = options.redis_binary()
        self.tls: TLSFiles | None = None
        if options.tls:
            if not self.binary.tls:
                pytest.skip(f"{self.binary} is built without TLS")
            self.tls = make_tls_files(directory / "tls")
        self.start_seconds = 0.0
        self._generation = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.binary.name} {self.url}>"

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """What TaskRunner / TASKRUNNER_REDIS_URL take (no credentials)."""

    @abc.abstractmethod
    def connect(self, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[AnyRedis]:
        """``async with topology.connect() as client``: a redis-py asyncio client for
        this topology (decode_responses on by default), closed on exit."""

    @abc.abstractmethod
    def pids(self) -> dict[str, int]:
        """Process id of every live data node (masters and replicas), by address."""

    @abc.abstractmethod
    def master_pids(self) -> dict[str, int]:
        """Process id of every master, by address (per-shard CPU)."""

    @abc.abstractmethod
    def kill_master(self, key: str | None = None) -> RedisProcess:
        """SIGKILL the master (on a cluster: the one owning ``key``, else slot 0's)."""

    @abc.abstractmethod
    def wait_failover(self, killed: RedisProcess, timeout: float | None = None) -> None:
        """Wait until writes work again without ``killed``: a replica was promoted (a
        standalone server has none, so it is restarted on its port instead)."""

    @abc.abstractmethod
    def restart(self, node: RedisProcess) -> None:
        """Start a killed node again (it comes back as a replica where there is a
        new master) and wait until healthy."""

    @abc.abstractmethod
    def healthy(self) -> bool: ...

    def describe(self) -> str:
        """What each process says of itself (for failure messages)."""
        return repr(self)

    @abc.abstractmethod
    def _start(self, directory: Path) -> None: ...

    @abc.abstractmethod
    def _stop(self) -> None: ...

    @abc.abstractmethod
    def _heal(self, timeout: float) -> None: ...

    def start(self) -> None:
        began = time.monotonic()
        self._start(self._next_directory())
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        self._stop()

    def heal(self, timeout: float = 30.0) -> None:
        """Restart what was killed and wait until healthy; rebuild on new ports if not."""
        try:
            self._heal(timeout)
        except (NotReadyError, RedisProcessError, OSError, redis.RedisError) as exc:
            print(f"{self!r} did not heal ({exc!r}): rebuilding it", file=sys.stderr)
            self._stop()
            self.start()

    def _next_directory(self) -> Path:
        self._generation += 1
        directory = self.directory / f"gen-{self._generation}"
        shutil.rmtree(directory, ignore_errors=True)
        return directory


class StandaloneTopology(Topology):
    name: TopologyName = "standalone"

    def _start(self, directory: Path) -> None:
        self.server = RedisProcess(
            directory,
            appendonly=self.options.appendonly,
            binary=self.binary.path,
            args=["--appendfsync", self.options.appendfsync],
            tls=self.tls,
            start_timeout=self.options.timeout,
        )
        self.server.start()

    def _stop(self) -> None:
        self.server.kill()

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"{self.server.url}?{self.tls.url_query()}"
        return self.server.url

    @contextlib.asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[AnyRedis]:
        kwargs.setdefault("decode_responses", True)
        client = redis.asyncio.Redis(**self.server.client_kwargs(), **kwargs)
        try:
            yield client
        finally:
            await client.aclose()

    def pids(self) -> dict[str, int]:
        pid = self.server.pid
        return {self.server.address: pid} if pid is not None and self.server.running else {}

    def master_pids(self) -> dict[str, int]:
        return self.pids()

    def kill_master(self, key: str | None = None) -> RedisProcess:
        self.server.kill()
        return self.server

    def wait_failover(self, killed: RedisProcess, timeout: float | None = None) -> None:
        if not killed.running:
            killed.start()

    def restart(self, node: RedisProcess) -> None:
        if not node.running:
            node.start()

    def healthy(self) -> bool:
        return self.server.running and ping(self.server.port, probe=self.server.probe) == "+PONG"

    def _heal(self, timeout: float) -> None:
        if not self.server.running:
            self.server.start()
        poll_until(self.healthy, timeout, "standalone healthy")


class ClusterTopology(Topology):
    name: TopologyName = "cluster"

    def _start(self, directory: Path) -> None:
        self.cluster = LocalCluster(
            directory,
            binary=self.binary.path,
            tls=self.tls,
            appendonly=self.options.appendonly,
            appendfsync=self.options.appendfsync,
            timeout=self.options.timeout,
        )
        self.cluster.start()

    def _stop(self) -> None:
        self.cluster.stop()

    @property
    def url(self) -> str:
        return self.cluster.url

    def connect(self, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[AnyRedis]:
        return self.cluster.connect(**kwargs)

    def pids(self) -> dict[str, int]:
        return self.cluster.pids()

    def master_pids(self) -> dict[str, int]:
        return self.cluster.master_pids()

    def kill_master(self, key: str | None = None) -> RedisProcess:
        return self.cluster.kill_master(key=key)

    def wait_failover(self, killed: RedisProcess, timeout: float | None = None) -> None:
        self.cluster.wait_failover(killed, timeout)

    def restart(self, node: RedisProcess) -> None:
        self.cluster.restart(node)

    def healthy(self) -> bool:
        return self.cluster.healthy()

    def describe(self) -> str:
        return self.cluster.describe()

    def _heal(self, timeout: float) -> None:
        # Let a replica take over a dead master's slots first, so that the dead node
        # rejoins as a replica instead of racing its own replica.
        for node in self.cluster.nodes:
            if not node.running and self._owns_slots(node):
                self.cluster.wait_failover(node, timeout)
        self.cluster.heal(timeout)

    def _owns_slots(self, node: RedisProcess) -> bool:
        live = self.cluster.live_nodes()
        if not live:
            return False
        node_id = self.cluster.node_id(node)
        return any(v.node_id == node_id and v.slots for v in self.cluster.view(live[0]))


class SentinelTopology(Topology):
    name: TopologyName = "sentinel"

    def _start(self, directory: Path) -> None:
        self.group = LocalSentinel(
            directory,
            binary=self.binary.path,
            tls=self.tls,
            appendonly=self.options.appendonly,
            appendfsync=self.options.appendfsync,
            timeout=self.options.timeout,
        )
        self.group.start()

    def _stop(self) -> None:
        self.group.stop()

    @property
    def url(self) -> str:
        return self.group.url

    def connect(self, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[AnyRedis]:
        return self.group.connect(**kwargs)

    def pids(self) -> dict[str, int]:
        return self.group.pids()

    def master_pids(self) -> dict[str, int]:
        master = self.group.master()
        return {master.address: master.pid} if master.pid is not None else {}

    def kill_master(self, key: str | None = None) -> RedisProcess:
        return self.group.kill_master()

    def wait_failover(self, killed: RedisProcess, timeout: float | None = None) -> None:
        self.group.wait_failover(killed, timeout)

    def restart(self, node: RedisProcess) -> None:
        self.group.restart(node)

    def healthy(self) -> bool:
        return self.group.healthy()

    def describe(self) -> str:
        return self.group.describe()

    def _heal(self, timeout: float) -> None:
        self.group.heal(timeout)


_CLASSES: dict[TopologyName, type[Topology]] = {
    "standalone": StandaloneTopology,
    "cluster": ClusterTopology,
    "sentinel": SentinelTopology,
}


def build_topology(name: TopologyName, directory: Path, options: TopologyOptions) -> Topology:
    """Start a topology (the caller stops it)."""
    topology = _CLASSES[name](directory, options)
    topology.start()
    return topology


# -- pytest wiring (conftest imports the fixtures and calls the hooks) -----------------


def configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*names): run the test once per named topology "
        "(standalone, cluster, sentinel); redis_url follows it",
    )


def selected(names: tuple[str, ...]) -> list[TopologyName]:
    """``names`` narrowed by TEST_TOPOLOGIES (comma-separated), in the marker's order."""
    for name in names:
        if name not in TOPOLOGIES:
            raise pytest.UsageError(f"unknown topology {name!r}: use one of {TOPOLOGIES}")
    allowed = os.environ.get("TEST_TOPOLOGIES")
    chosen = [cast(TopologyName, n) for n in names]
    if allowed:
        wanted = {n.strip() for n in allowed.split(",")}
        chosen = [n for n in chosen if n in wanted]
    return chosen


def generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``topology`` (indirectly) for tests with the marker or the fixture."""
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None and "topology" not in metafunc.fixturenames:
        return
    names = selected(tuple(marker.args) if marker is not None else ("standalone",))
    if "topology" not in metafunc.fixturenames:
        metafunc.fixturenames.append("topology")
    metafunc.parametrize("topology", names, indirect=True, ids=list(names))


def _session_topology(
    name: TopologyName, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    topology = _CLASSES[name](tmp_path_factory.mktemp(name), TopologyOptions.from_env())
    topology.start()
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def standalone_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from _session_topology("standalone", tmp_path_factory)


@pytest.fixture(scope="session")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from _session_topology("cluster", tmp_path_factory)


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    yield from _session_topology("sentinel", tmp_path_factory)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """The session's topology named by the test's parameter, healed after the test."""
    name = cast(TopologyName, getattr(request, "param", "standalone"))
    current = cast(Topology, request.getfixturevalue(f"{name}_topology"))
    yield current
    current.heal()


MakeTopology = Callable[..., Topology]


@pytest.fixture
def make_topology(tmp_path: Path) -> Iterator[MakeTopology]:
    """Build private topologies for one test: ``make_topology("sentinel",
    appendfsync="always")`` (keywords are TopologyOptions fields); stopped at the end."""
    built: list[Topology] = []

    def make(name: TopologyName, **options: Any) -> Topology:
        base = replace(TopologyOptions.from_env(), **options)
        topology = _CLASSES[name](tmp_path / f"{name}-{len(built)}", base)
        built.append(topology)
        topology.start()
        return topology

    yield make
    for topology in built:
        with contextlib.suppress(RedisProcessError):
            topology.stop()
