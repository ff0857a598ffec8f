"""A real Redis Cluster on loopback: 3 masters + 3 replicas of redis-server, for tests.

    with LocalCluster(tmp_path) as cluster:
        async with cluster.connect() as client:     # redis.asyncio.RedisCluster
            ...
        cluster.url                                 # redis+cluster://127.0.0.1:P1,...
        killed = cluster.kill_master(key="q")       # SIGKILL the master owning "q"
        cluster.wait_failover(killed)               # its replica is master, state ok
        cluster.restart(killed)                     # it rejoins as a replica
        cluster.move_slot(slot, cluster.masters()[1])   # migrate one slot with its keys

Ports come from 15000-22767 so the cluster bus port (port + 10000, fixed on Redis 6.2)
stays below Linux's ephemeral range. The nodes join with ``redis-cli --cluster create``
(``join="cli"``) or by hand with CLUSTER MEET/ADDSLOTS/REPLICATE (``join="meet"``).
Every wait has a deadline and fails with the nodes' own view of the cluster.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import redis
import redis.asyncio
import redis.cluster
from polling import poll_until
from redis.crc import key_slot
from redisproc import AdminClients, RedisProcess, RedisProcessError
from tlsfiles import TLSFiles

SLOTS = 16384
BUS_OFFSET = 10000
PORT_RANGE = (15000, 22767)
Join = Literal["cli", "meet"]


def cluster_port() -> int:
    """A port P such that P and its cluster bus port P + 10000 were both free a moment ago."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RedisProcessError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    address: str
    flags: frozenset[str]
    master_id: str | None
    slots: frozenset[int]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def parse_nodes(text: str) -> list[NodeView]:
    """Parse ``CLUSTER NODES`` (slot ranges expanded; migrating markers skipped)."""
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots: set[int] = set()
        for item in parts[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        views.append(
            NodeView(
                node_id=parts[0],
                address=parts[1].split("@")[0].split(",")[0],
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                slots=frozenset(slots),
            )
        )
    return views


def key_for_slot(slot: int, prefix: str = "fx") -> str:
    """A key name that hashes to ``slot``."""
    i = 0
    while key_slot(f"{prefix}{i}".encode()) != slot:
        i += 1
    return f"{prefix}{i}"


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, in ``directory``/node-N."""

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        binary: str | None = None,
        tls: TLSFiles | None = None,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] | None = None,
        node_timeout_ms: int = 1500,
        join: Join | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.tls = tls
        self.timeout = timeout
        self.replicas_per_master = replicas
        self.master_count = masters
        self.join: Join = join or ("cli" if shutil.which("redis-cli") else "meet")
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # Keep the shape 3 + 3: no replica wanders to an orphaned master, and a
            # replica may always take over whatever its replication lag.
            "--cluster-migration-barrier",
            "999",
            "--cluster-replica-validity-factor",
            "0",
            # A replica syncs at once (Redis 7 waits 5 s for more replicas by default).
            "--repl-diskless-sync-delay",
            "0",
        ]
        if appendfsync is not None:
            args += ["--appendfsync", appendfsync]
        if tls is not None:
            args += ["--tls-cluster", "yes"]
        self.nodes = [
            RedisProcess(
                self.directory / f"node-{i}",
                appendonly=appendonly,
                binary=binary,
                args=args,
                tls=tls,
                pick_port=cluster_port,
                start_timeout=timeout,
            )
            for i in range(masters * (1 + replicas))
        ]
        self._ids: dict[str, str] = {}
        self._admins = AdminClients()

    # -- addresses and clients ---------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,...`` (``rediss+cluster://...?ssl_...`` with TLS)."""
        hosts = ",".join(self.addresses)
        if self.tls is None:
            return f"redis+cluster://{hosts}"
        return f"rediss+cluster://{hosts}?{self.tls.url_query()}"

    def client(self, **kwargs: Any) -> redis.asyncio.RedisCluster:
        """An asyncio cluster client (decode_responses on unless given); ``aclose()`` it."""
        kwargs.setdefault("decode_responses", True)
        nodes = [redis.asyncio.cluster.ClusterNode("127.0.0.1", n.port) for n in self.nodes]
        return redis.asyncio.RedisCluster(startup_nodes=nodes, **self._tls_kwargs(), **kwargs)

    @contextlib.asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[redis.asyncio.RedisCluster]:
        """``client()``, closed on exit."""
        client = self.client(**kwargs)
        try:
            yield client
        finally:
            await client.aclose()

    def sync_client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        kwargs.setdefault("decode_responses", True)
        nodes = [
            redis.cluster.ClusterNode("127.0.0.1", n.port)  # type: ignore[no-untyped-call]
            for n in self.nodes
        ]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **self._tls_kwargs(), **kwargs)

    def _tls_kwargs(self) -> dict[str, Any]:
        return self.tls.redis_kwargs() if self.tls is not None else {}

    @contextlib.contextmanager
    def admin(self, node: RedisProcess) -> Iterator[redis.Redis]:
        """A direct connection to one node (no redirections; cached, no retries)."""
        yield self._admins.get(node)

    def command(self, node: RedisProcess, *args: Any) -> Any:
        with self.admin(node) as client:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start every node, join them, and wait until the cluster is healthy."""
        try:
            self._start_nodes(self.nodes)
            self._ids = {n.address: str(self.command(n, "CLUSTER", "MYID")) for n in self.nodes}
            if self.join == "cli":
                self._join_with_cli()
            else:
                self._join_with_meet()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL every node (a test cluster's data is throw-away)."""
        self._admins.close()
        for node in self.nodes:
            with contextlib.suppress(RedisProcessError):
                node.kill()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_nodes(self, nodes: Sequence[RedisProcess]) -> None:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            for future in [pool.submit(node.start) for node in nodes]:
                future.result()

    def _join_with_cli(self) -> None:
        command = ["redis-cli", "--cluster", "create", *self.addresses]
        command += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        if self.tls is not None:
            command += ["--tls", "--cacert", str(self.tls.ca_cert)]
            command += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RedisProcessError(f"redis-cli --cluster create failed:\n{result.stdout}")

    def _join_with_meet(self) -> None:
        masters = self.nodes[: self.master_count]
        per = SLOTS // len(masters)
        for i, node in enumerate(masters):
            last = SLOTS if i == len(masters) - 1 else (i + 1) * per
            self.command(node, "CLUSTER", "ADDSLOTS", *range(i * per, last))
            self.command(node, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.command(node, "CLUSTER", "MEET", "127.0.0.1", first.port)
        poll_until(self._all_known, self.timeout, "nodes meet", details=self.describe)
        replicas = self.nodes[self.master_count :]
        for i, node in enumerate(replicas):
            master = masters[i % len(masters)]
            self.command(node, "CLUSTER", "REPLICATE", self._ids[master.address])

    def _all_known(self) -> bool:
        ids = set(self._ids.values())
        for node in self.nodes:
            views = self.view(node)
            if {v.node_id for v in views} != ids or any(v.failing for v in views):
                return False
        return True

    # -- the cluster's own view --------------------------------------------------------

    def view(self, node: RedisProcess) -> list[NodeView]:
        """``CLUSTER NODES`` as ``node`` sees it."""
        return parse_nodes(str(self.command(node, "CLUSTER", "NODES")))

    def cluster_info(self, node: RedisProcess) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node`` as a dict."""
        text = str(self.command(node, "CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def live_nodes(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.running]

    def node(self, address: str) -> RedisProcess:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(address)

    def node_id(self, node: RedisProcess) -> str:
        return self._ids[node.address]

    def masters(self) -> list[RedisProcess]:
        """Live masters that own slots, as a live node sees them."""
        views = self.view(self.live_nodes()[0])
        return [self.node(v.address) for v in views if v.is_master and v.slots and not v.failing]

    def replicas_of(self, master: RedisProcess) -> list[RedisProcess]:
        views = self.view(self.live_nodes()[0])
        mid = self.node_id(master)
        return [self.node(v.address) for v in views if v.master_id == mid]

    def slot_owner(self, slot: int) -> RedisProcess:
        """The master that owns ``slot`` (as a live node sees it)."""
        for v in self.view(self.live_nodes()[0]):
            if v.is_master and slot in v.slots:
                return self.node(v.address)
        raise KeyError(f"slot {slot} is not covered")

    def key_owner(self, key: str) -> RedisProcess:
        return self.slot_owner(key_slot(key.encode()))

    def pids(self) -> dict[str, int]:
        """Process id of every live node, by address."""
        return {n.address: n.pid for n in self.nodes if n.pid is not None and n.running}

    def master_pids(self) -> dict[str, int]:
        """Process id of every master that owns slots (for per-shard CPU)."""
        return {n.address: n.pid for n in self.masters() if n.pid is not None}

    def healthy(self) -> bool:
        """Every node up; every node says state ok, sees all slots and the same owners;
        every master has its replicas with the replication link up."""
        try:  # a node that is down or starting cannot answer: not healthy
            return self._check_health()
        except (OSError, redis.RedisError):
            return False

    def _check_health(self) -> bool:
        if not all(node.running for node in self.nodes):
            return False
        maps = set()
        for node in self.nodes:
            info = self.cluster_info(node)
            if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                return False
            views = self.view(node)
            if any(v.failing for v in views) or len(views) != len(self.nodes):
                return False
            maps.add(frozenset((v.node_id, v.slots) for v in views if v.is_master))
            if "slave" in self._myself(views).flags and not self._link_up(node):
                return False
        if len(maps) != 1:
            return False
        masters = [v for v in self.view(self.nodes[0]) if v.is_master and v.slots]
        replicas = [v for v in self.view(self.nodes[0]) if v.master_id is not None]
        return len(masters) == self.master_count and all(
            sum(r.master_id == m.node_id for r in replicas) == self.replicas_per_master
            for m in masters
        )

    def describe(self) -> str:
        """Every live node's ``CLUSTER NODES`` (for failure messages)."""
        out = []
        for node in self.nodes:
            if not node.running:
                out.append(f"{node.address}: not running")
                continue
            try:
                out.append(f"{node.address} sees:\n{self.command(node, 'CLUSTER', 'NODES')}")
            except redis.RedisError as exc:
                out.append(f"{node.address}: {exc!r}")
        return "\n".join(out)

    @staticmethod
    def _myself(views: list[NodeView]) -> NodeView:
        return next(v for v in views if "myself" in v.flags)

    def _link_up(self, node: RedisProcess) -> bool:
        info = self.command(node, "INFO", "replication")
        return bool(info.get("master_link_status") == "up")

    def wait_replicated(self, master: RedisProcess, timeout: float | None = None) -> None:
        """Wait until every replica of ``master`` has all it had written so far (so a
        kill loses nothing)."""
        offset = int(self.command(master, "INFO", "replication")["master_repl_offset"])
        replicas = self.replicas_of(master)

        def caught_up() -> bool:
            for replica in replicas:
                info = self.command(replica, "INFO", "replication")
                if int(info.get("slave_repl_offset", -1)) < offset:
                    return False
            return True

        poll_until(caught_up, timeout or self.timeout, "replicas caught up")

    def wait_healthy(self, timeout: float | None = None) -> None:
        poll_until(
            self.healthy,
            timeout or self.timeout,
            "cluster healthy",
            interval=0.05,
            details=self.describe,
        )

    # -- faults ------------------------------------------------------------------------

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL one node."""
        node.kill()

    def kill_master(self, key: str | None = None, slot: int | None = None) -> RedisProcess:
        """SIGKILL the master owning ``key`` or ``slot`` (slot 0 by default); return it."""
        target = self.slot_owner(key_slot(key.encode()) if key is not None else slot or 0)
        target.kill()
        return target

    def wait_failover(self, killed: RedisProcess, timeout: float | None = None) -> RedisProcess:
        """Wait until a replica of ``killed`` owns its slots, every live node says state
        ok, and the new master accepts a write; return the new master."""
        killed_id = self.node_id(killed)
        slot = next(iter(self._slots_of(killed_id)))
        key = key_for_slot(slot, "failover")

        def promoted() -> bool:
            for node in self.live_nodes():
                if self.cluster_info(node)["cluster_state"] != "ok":
                    return False
            owner = self.slot_owner(slot)
            if owner is killed:
                return False
            self.command(owner, "SET", key, "1")
            return True

        poll_until(promoted, timeout or self.timeout, "replica promoted", details=self.describe)
        return self.slot_owner(slot)

    def _slots_of(self, node_id: str) -> frozenset[int]:
        for node in self.live_nodes():
            for v in self.view(node):
                if v.node_id == node_id and v.slots:
                    return v.slots
        raise KeyError(f"node {node_id} owns no slot")

    def restart(self, node: RedisProcess, timeout: float | None = None) -> None:
        """Start a killed node again (same port and nodes.conf); wait until the cluster
        is healthy, with the node back as a replica if its slots moved meanwhile."""
        node.start()
        self.wait_healthy(timeout)

    def heal(self, timeout: float | None = None) -> None:
        """Start every dead node and wait until the cluster is healthy."""
        dead = [node for node in self.nodes if not node.running]
        if dead:
            self._start_nodes(dead)
        self.wait_healthy(timeout)

    # -- resharding --------------------------------------------------------------------

    def begin_migration(self, slot: int, target: RedisProcess) -> SlotMigration:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner."""
        source = self.slot_owner(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on {target.address}")
        self.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return SlotMigration(self, slot, source, target)

    def move_slot(self, slot: int, target: RedisProcess, batch: int = 100) -> int:
        """Move ``slot`` and its keys to ``target``; return how many keys moved."""
        migration = self.begin_migration(slot, target)
        moved = 0
        while count := migration.move_keys(batch):
            moved += count
        migration.finish()
        return moved


class SlotMigration:
    """One slot on its way from ``source`` to ``target`` (see LocalCluster.move_slot)."""

    def __init__(
        self, cluster: LocalCluster, slot: int, source: RedisProcess, target: RedisProcess
    ) -> None:
        self.cluster = cluster
        self.slot = slot
        self.source = source
        self.target = target

    def move_keys(self, count: int = 100) -> int:
        """MIGRATE up to ``count`` keys of the slot; return how many were moved."""
        keys = self.cluster.command(self.source, "CLUSTER", "GETKEYSINSLOT", self.slot, count)
        if not keys:
            return 0
        args: list[Any] = ["MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "REPLACE"]
        self.cluster.command(self.source, *args, "KEYS", *keys)
        return len(keys)

    def finish(self, timeout: float | None = None) -> None:
        """Assign the slot to the target everywhere and wait until every node agrees."""
        target_id = self.cluster.node_id(self.target)
        remaining = self.cluster.command(self.source, "CLUSTER", "COUNTKEYSINSLOT", self.slot)
        if remaining:
            raise RedisProcessError(f"slot {self.slot} still has {remaining} keys on the source")
        self.cluster.command(self.target, "CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
        self.cluster.command(self.source, "CLUSTER", "SETSLOT", self.slot, "NODE", target_id)
        for master in self.cluster.masters():
            if master is not self.target and master is not self.source:
                self.cluster.command(master, "CLUSTER", "SETSLOT", self.slot, "NODE", target_id)

        def agreed() -> bool:
            for node in self.cluster.live_nodes():
                owners = [v for v in self.cluster.view(node) if self.slot in v.slots]
                if [v.node_id for v in owners] != [target_id]:
                    return False
            return True

        poll_until(
            agreed,
            timeout or self.cluster.timeout,
            f"slot {self.slot} moved",
            details=self.cluster.describe,
        )
