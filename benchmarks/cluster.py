"""A throw-away Redis Cluster on loopback for benchmarks: N masters, no replicas.

    with loopback_cluster(3) as nodes:      # ["127.0.0.1:P1", ...], state ok everywhere
        url = "redis+cluster://" + ",".join(nodes)

Each node is a ``redis-server`` (benchmarks.run's ``find_redis_server``) in its own temp
dir, without persistence, on a port P whose cluster bus port P + 10000 is free too (both
from 15000-22767, below Linux's ephemeral range). The nodes join with ``redis-cli
--cluster create ... --cluster-replicas 0``: a benchmark of throughput needs no replicas
(a replica adds the master's replication stream, not work on the hot path's scripts).
Every wait has a deadline; every node is stopped on exit.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.run import find_redis_server
from benchmarks.systems._common import redis_command

BUS_OFFSET = 10_000
PORT_RANGE = (15_000, 22_767)
START_DEADLINE = 30.0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A port P such that P and P + 10000 were both free a moment ago."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        if port not in taken and _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise SystemExit("no free port pair for a cluster node")


def _info_field(url: str, section: str, name: str) -> str:
    text = redis_command(url, *section.split(), timeout=2).decode(errors="replace")
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _pong(url: str) -> bool:
    return redis_command(url, "PING", timeout=1).startswith(b"+PONG")


def _state_ok(url: str) -> bool:
    return _info_field(url, "CLUSTER INFO", "cluster_state") == "ok"


def _wait(condition: str, check: Callable[[str], bool], url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check(url):
                return
        time.sleep(0.05)
    raise SystemExit(f"cluster: {condition} not reached within {START_DEADLINE:.0f} s")


@contextlib.contextmanager
def loopback_cluster(masters: int = 3) -> Iterator[list[str]]:
    """Start ``masters`` cluster nodes, join them, wait for state ok; yield addresses."""
    if shutil.which("redis-cli") is None:
        raise SystemExit("redis-cli is needed to create the cluster")
    binary = find_redis_server()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        ports: list[int] = []
        try:
            for i in range(masters):
                port = cluster_port(set(ports))
                ports.append(port)
                directory = Path(tmp) / f"node-{i}"
                directory.mkdir()
                cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
                cmd += ["--appendonly", "no", "--dir", str(directory), "--daemonize", "no"]
                cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                cmd += ["--cluster-node-timeout", "5000"]
                procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            addresses = [f"127.0.0.1:{port}" for port in ports]
            deadline = time.monotonic() + START_DEADLINE
            for address in addresses:
                _wait(f"{address} answers", _pong, f"redis://{address}/0", deadline)
            _create(addresses)
            for address in addresses:
                _wait(f"{address} state ok", _state_ok, f"redis://{address}/0", deadline)
            yield addresses
        finally:
            _stop(procs)


def _create(addresses: list[str]) -> None:
    command = ["redis-cli", "--cluster", "create", *addresses]
    command += ["--cluster-replicas", "0", "--cluster-yes"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise SystemExit(f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
