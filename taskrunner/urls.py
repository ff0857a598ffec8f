"""Redis URLs: parse and validate them, and hide their passwords.

(Provisional minimal version; the full grammar with TLS options lands separately.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from taskrunner.exceptions import ConfigurationError

Topology = Literal["standalone", "cluster", "sentinel"]

_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_PASSWORD = re.compile(r"(?P<head>[a-z+]+://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<tail>@)")


def redact(text: str) -> str:
    """``text`` with the password of every Redis URL in it replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names. The password never appears in repr or str."""

    url: str = field(repr=False)
    topology: Topology
    nodes: tuple[tuple[str, int], ...] = ()
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_options: dict[str, Any] = field(default_factory=dict)
    master_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        return redact(self.url)

    def __str__(self) -> str:
        return self.redacted()


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis URL; ConfigurationError (one sentence, password hidden) if bad."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"invalid Redis URL {shown!r}: the scheme must be one of {', '.join(_SCHEMES)}"
        )
    topology, tls = _SCHEMES[scheme]
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if scheme == "unix":
        return RedisTarget(
            url,
            topology,
            unix_path=parts.path,
            db=_db(query.get("db", "0"), shown),
            username=username,
            password=password,
        )
    netloc = parts.netloc.rpartition("@")[2]
    nodes = tuple(_node(n, shown) for n in netloc.split(",") if n)
    if not nodes:
        raise ConfigurationError(f"invalid Redis URL {shown!r}: no host")
    path = [p for p in parts.path.split("/") if p]
    master = None
    if topology == "sentinel":
        if not path:
            raise ConfigurationError(f"invalid Redis URL {shown!r}: no master name")
        master, path = path[0], path[1:]
    db = _db(path[0], shown) if path else 0
    return RedisTarget(
        url,
        topology,
        nodes=nodes,
        db=db,
        username=username,
        password=password,
        tls=tls,
        master_name=master,
    )


def _node(text: str, shown: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 6379
    try:
        return host, int(port)
    except ValueError:
        raise ConfigurationError(f"invalid Redis URL {shown!r}: bad port {port!r}") from None


def _db(text: str, shown: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ConfigurationError(f"invalid Redis URL {shown!r}: bad database {text!r}") from None
    if db < 0:
        raise ConfigurationError(f"invalid Redis URL {shown!r}: bad database {text!r}")
    return db
