"""A Sentinel-managed Redis on loopback: a master, a replica and 3 sentinels, for tests.

    with LocalSentinel(tmp_path) as group:
        group.url                       # redis+sentinel://127.0.0.1:S1,.../mymaster/0
        async with group.connect() as client:   # redis.asyncio.Redis following the master
            ...
        old = group.kill_master()       # SIGKILL the current master
        new = group.wait_failover(old)  # sentinels agree on the replica, it takes writes
        group.restart(old)              # back as a replica of the new master

Sentinels watch with ``down-after-milliseconds`` 1000 and ``failover-timeout`` 5000 by
default, so a failover takes about 3 s. The data nodes can run with ``appendonly yes``
and ``appendfsync always``. With ``tls`` every node and sentinel serves TLS only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

import redis
import redis.asyncio
import redis.asyncio.sentinel
from polling import poll_until
from redisproc import AdminClients, RedisProcess, RedisProcessError
from tlsfiles import TLSFiles


class LocalSentinel:
    """``replicas`` + 1 data nodes and ``sentinels`` sentinels monitoring ``name``."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        binary: str | None = None,
        tls: TLSFiles | None = None,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        timeout: float = 60.0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.name = name
        self.tls = tls
        self.quorum = quorum
        self.timeout = timeout
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        args = ["--repl-diskless-sync-delay", "0"]
        if appendfsync is not None:
            args += ["--appendfsync", appendfsync]
        self.data = [
            RedisProcess(
                self.directory / f"data-{i}",
                appendonly=appendonly,
                binary=binary,
                args=args,
                tls=tls,
                start_timeout=timeout,
            )
            for i in range(1 + replicas)
        ]
        self._admins = AdminClients()
        self.sentinels = [
            RedisProcess(
                self.directory / f"sentinel-{i}",
                binary=binary,
                tls=tls,
                config_file=self.directory / f"sentinel-{i}" / "sentinel.conf",
                sentinel=True,
                start_timeout=timeout,
            )
            for i in range(sentinels)
        ]

    # -- addresses and clients ---------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+sentinel://S1,S2,S3/NAME/0`` (``rediss+sentinel://...?ssl_...`` with TLS)."""
        hosts = ",".join(s.address for s in self.sentinels)
        if self.tls is None:
            return f"redis+sentinel://{hosts}/{self.name}/0"
        return f"rediss+sentinel://{hosts}/{self.name}/0?{self.tls.url_query()}"

    def sentinel_client(self, **kwargs: Any) -> redis.asyncio.Sentinel:
        """An asyncio ``Sentinel`` over all sentinels (TLS to sentinels and data nodes)."""
        tls = self.tls.redis_kwargs() if self.tls is not None else {}
        return redis.asyncio.Sentinel(  # type: ignore[no-untyped-call]
            [("127.0.0.1", s.port) for s in self.sentinels],
            sentinel_kwargs={"socket_timeout": 5, **tls},
            **tls,
            **kwargs,
        )

    @contextlib.asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[redis.asyncio.Redis]:
        """An asyncio client that follows the master (decode_responses on unless given);
        its connections and the sentinels' are closed on exit."""
        kwargs.setdefault("decode_responses", True)
        sentinel = self.sentinel_client()
        client: redis.asyncio.Redis = sentinel.master_for(self.name, **kwargs)
        try:
            yield client
        finally:
            await client.aclose()
            for each in sentinel.sentinels:
                await each.aclose()

    @contextlib.contextmanager
    def admin(self, node: RedisProcess) -> Iterator[redis.Redis]:
        """A direct connection to one node (no redirections; cached, no retries)."""
        yield self._admins.get(node)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the master, the replicas (synced), then the sentinels; wait until healthy."""
        try:
            master, *replicas = self.data
            master.start()
            for replica in replicas:
                replica.start(["--replicaof", "127.0.0.1", str(master.port)])
            for sentinel in self.sentinels:
                sentinel.directory.mkdir(parents=True, exist_ok=True)
                self._write_config(sentinel, master)
                sentinel.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL every sentinel and data node (throw-away data)."""
        self._admins.close()
        for node in [*self.sentinels, *self.data]:
            with contextlib.suppress(RedisProcessError):
                node.kill()

    def __enter__(self) -> LocalSentinel:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self, sentinel: RedisProcess, master: RedisProcess) -> None:
        assert sentinel.config_file is not None
        lines = [
            f"sentinel monitor {self.name} 127.0.0.1 {master.port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.name} 1",
        ]
        sentinel.config_file.write_text("".join(f"{line}\n" for line in lines))

    # -- the sentinels' view -----------------------------------------------------------

    def master_address(self, sentinel: RedisProcess) -> str | None:
        """``SENTINEL get-master-addr-by-name`` as ``sentinel`` answers it."""
        with self.admin(sentinel) as client:
            found = cast(tuple[str, int] | None, client.sentinel_get_master_addr_by_name(self.name))
        return f"{found[0]}:{found[1]}" if found else None

    def node(self, address: str) -> RedisProcess:
        for node in self.data:
            if node.address == address:
                return node
        raise KeyError(address)

    def master(self) -> RedisProcess:
        """The data node that the first live sentinel names as master."""
        sentinel = next(s for s in self.sentinels if s.running)
        address = self.master_address(sentinel)
        if address is None:
            raise RedisProcessError(f"sentinel {sentinel.address} knows no master")
        return self.node(address)

    def replicas(self) -> list[RedisProcess]:
        master = self.master()
        return [node for node in self.data if node is not master]

    def pids(self) -> dict[str, int]:
        """Process id of every live data node, by address."""
        return {n.address: n.pid for n in self.data if n.pid is not None and n.running}

    def role(self, node: RedisProcess) -> dict[str, Any]:
        with self.admin(node) as client:
            info: dict[str, Any] = client.info("replication")
        return info

    def healthy(self) -> bool:
        """All processes up; all sentinels agree on a master that says it is one and
        see each other; every other data node replicates from it with the link up."""
        try:  # a node that is down or starting cannot answer: not healthy
            return self._check_health()
        except (OSError, redis.RedisError):
            return False

    def _check_health(self) -> bool:
        if not all(n.running for n in [*self.data, *self.sentinels]):
            return False
        addresses = {self.master_address(s) for s in self.sentinels}
        if len(addresses) != 1 or None in addresses:
            return False
        master = self.node(str(addresses.pop()))
        if self.role(master)["role"] != "master":
            return False
        for node in self.data:
            if node is not master and not self._replicates(node, master):
                return False
        return all(self._sentinel_ok(s) for s in self.sentinels)

    def _replicates(self, node: RedisProcess, master: RedisProcess) -> bool:
        info = self.role(node)
        return (
            info["role"] == "slave"
            and int(info["master_port"]) == master.port
            and info["master_link_status"] == "up"
        )

    def _sentinel_ok(self, sentinel: RedisProcess) -> bool:
        with self.admin(sentinel) as client:
            state = cast(dict[str, Any], client.sentinel_master(self.name))
            replicas = client.sentinel_slaves(self.name)
        others = len(self.sentinels) - 1
        replicas_up = [r for r in replicas if _reachable(r)]
        # A failover that began while the master was down goes on after it is back, and
        # may still promote a replica that came back in time: not healthy until it ends.
        # A sentinel whose link to a node is down ("disconnected") has not yet marked it
        # down only because down-after-milliseconds has not passed: not healthy either
        # (seen: a group that looked healthy right after a full restart had a sentinel
        # flag its master s_down a moment later).
        return (
            _reachable(state)
            and "failover_in_progress" not in _flags(state)
            and state["num-other-sentinels"] == others
            and len(replicas_up) == len(self.data) - 1
        )

    def describe(self) -> str:
        out = []
        for node in [*self.data, *self.sentinels]:
            kind = "sentinel" if node.sentinel else "data"
            if not node.running:
                out.append(f"{kind} {node.address}: not running")
            elif node.sentinel:
                out.append(f"{kind} {node.address}: {self._sentinel_view(node)}")
            else:
                out.append(f"{kind} {node.address}: {self.role(node)}")
        return "\n".join(out)

    def _sentinel_view(self, sentinel: RedisProcess) -> str:
        with self.admin(sentinel) as client:
            state = cast(dict[str, Any], client.sentinel_master(self.name))
            replicas = client.sentinel_slaves(self.name)
        seen = ", ".join(f"{r['ip']}:{r['port']} {sorted(_flags(r))}" for r in replicas)
        return (
            f"master {state['ip']}:{state['port']} {sorted(_flags(state))}, "
            f"{state['num-other-sentinels']} other sentinels, replicas: {seen}"
        )

    def wait_healthy(self, timeout: float | None = None) -> None:
        poll_until(
            self.healthy,
            timeout or self.timeout,
            "sentinel group healthy",
            interval=0.05,
            details=self.describe,
        )

    # -- faults ------------------------------------------------------------------------

    def kill_master(self) -> RedisProcess:
        """SIGKILL the current master; return it."""
        master = self.master()
        master.kill()
        return master

    def wait_failover(self, killed: RedisProcess, timeout: float | None = None) -> RedisProcess:
        """Wait until every live sentinel names a live replica as master and it accepts
        a write; return the new master."""

        def promoted() -> bool:
            live = [s for s in self.sentinels if s.running]
            addresses = {self.master_address(s) for s in live}
            if len(addresses) != 1 or killed.address in addresses or None in addresses:
                return False
            master = self.node(str(addresses.pop()))
            with self.admin(master) as client:
                client.set("fixture:failover", "1")
            return True

        poll_until(promoted, timeout or self.timeout, "replica promoted", details=self.describe)
        return self.master()

    def restart(self, node: RedisProcess, *, as_replica: bool = True) -> None:
        """Start a killed data node again (same port and directory) and wait until healthy.

        ``as_replica`` starts it with ``replicaof`` the current master, as an operator
        would; with False it starts as it was (a stale master) and the sentinels convert
        it, which takes them 10-20 s.
        """
        extra: list[str] = []
        if as_replica:
            master = self.master()
            if master is not node:
                extra = ["--replicaof", "127.0.0.1", str(master.port)]
        node.start(extra)
        self.wait_healthy()

    def heal(self, timeout: float | None = None) -> None:
        """Start every dead sentinel and data node (after a failover, as replicas of the
        new master) and wait until healthy."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                sentinel.start()
        dead = [n for n in self.data if not n.running]
        if dead and len(dead) == len(self.data):
            # Nothing to fail over to: bring back the master the sentinels know first.
            master = self.master()
            master.start()
            dead.remove(master)
        elif self.master() in dead:
            self.wait_failover(self.master(), timeout)
        for node in dead:
            self.restart(node)
        self.wait_healthy(timeout)


def _reachable(state: dict[str, Any]) -> bool:
    """Whether a sentinel sees a node up and its link to it connected."""
    return not state["is_sdown"] and not state["is_odown"] and "disconnected" not in _flags(state)


def _flags(state: dict[str, Any]) -> set[str]:
    """A sentinel state's flags: a set on RESP3, a comma-separated string on RESP2."""
    flags = state["flags"]
    return set(flags) if isinstance(flags, set) else set(str(flags).split(","))
