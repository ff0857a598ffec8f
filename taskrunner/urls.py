"""Redis URLs: one grammar for every topology, validated up front, never printed with
a password.

::

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]                  standalone (port 6379)
    rediss://...                                                  the same over TLS
    unix://[[USER]:PASSWORD@]/path/to/redis.sock[?db=N]           standalone, unix socket
    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]
    rediss+cluster://...                                          Redis Cluster (TLS)
    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]
    rediss+sentinel://...                                         Sentinel (port 26379)

Query parameters (``?name=value&...``), each at most once:

* TLS (``rediss`` schemes only), with redis-py's names: ``ssl_ca_certs`` (CA bundle
  file), ``ssl_ca_path`` (CA directory), ``ssl_certfile`` and ``ssl_keyfile`` (client
  certificate), ``ssl_password`` (passphrase of the key file), ``ssl_cert_reqs``
  (``none``, ``optional``, ``required``; default ``required``), ``ssl_check_hostname``
  (``true``/``false``; default true, false when ``ssl_cert_reqs=none``),
  ``ssl_min_version`` (``TLSv1_2``, ``TLSv1_3``);
* Sentinel only: ``sentinel_username`` and ``sentinel_password``, for sentinels that
  have an ACL of their own (the user and password before ``@`` are the master's);
* ``unix://`` only: ``db``.

A user name, password or master name with reserved characters (``@ : / ? # % ,``) is
percent-encoded (``p%40ss`` for ``p@ss``), and so is a ``&`` or ``%`` in a query
parameter's value, where ``+`` is a plus sign (not a space). Anything else is refused with a
``ConfigurationError`` whose message is one sentence quoting the URL with every secret
replaced by ``***`` (see :func:`redact`).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from taskrunner.exceptions import ConfigurationError

__all__ = ["RedisTarget", "Topology", "parse_url", "redact"]

Topology = Literal["standalone", "cluster", "sentinel"]

MASK = "***"
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

_SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_SECRET_PARAMS = ("password", "sentinel_password", "ssl_password")
_TLS_PARAMS = frozenset(
    {
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)
_SENTINEL_PARAMS = frozenset({"sentinel_username", "sentinel_password"})
_CERT_REQS = ("none", "optional", "required")
_TLS_VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_HOST = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$")

# -- redaction ------------------------------------------------------------------------

_SCHEME_RE = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_STOP = r"\s'\"<>`"
_USERINFO_RE = re.compile(rf"({_SCHEME_RE}[^{_STOP}:@/\[\]]*):(?:(?!{_SCHEME_RE})[^\n])*@")
"""``scheme://user:password@``: everything up to the last ``@`` of the line before the
next URL is hidden, so a password with an unencoded ``@``, ``/`` or ``#``, a quote or a
space (which a message may print as it is, or inside a ``repr``) is hidden whole."""
_NO_AT_RE = re.compile(
    rf"({_SCHEME_RE}[^{_STOP}:@/\[\],]*):"
    r"(?=[^\s@/?#,]*[^\s@/?#,0-9])[^\s@/?#,]+(?=[\s/?#,]|$)"
)
"""``scheme://user:secret`` without ``@`` (a forgotten host): a "port" that is not a
number may be a password, so it is hidden too."""
_QUERY_RE = re.compile(rf"([?&](?:{'|'.join(_SECRET_PARAMS)})=)[^&#{_STOP}]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: the user-info
    password (``redis://user:***@host``), a secret query parameter (``password``,
    ``sentinel_password``, ``ssl_password``), and a non-numeric "port" of a URL without
    ``@`` (``redis://user:***``). Errs on hiding too much rather than too little."""
    if "://" not in text and "password" not in text.lower():
        return text
    text = _USERINFO_RE.sub(rf"\1:{MASK}@", text)
    text = _NO_AT_RE.sub(rf"\1:{MASK}", text)
    return _QUERY_RE.sub(rf"\g<1>{MASK}", text)


# -- the parsed target ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class RedisTarget:
    """Where and how to connect, as parsed from a URL by :func:`parse_url`.

    ``password``, ``sentinel_password``, the key passphrase in ``ssl_options`` and ``url`` never
    appear in ``repr()`` or ``str()``, which show :meth:`redacted`.
    """

    scheme: str
    """As written, lowercased: ``redis``, ``rediss``, ``unix``, ``redis+cluster``, ..."""
    topology: Topology
    """``standalone`` (``redis``, ``rediss``, ``unix``), ``cluster`` or ``sentinel``."""
    nodes: tuple[tuple[str, int], ...]
    """``(host, port)`` of the server (standalone), of the seed nodes (cluster) or of
    the sentinels (sentinel); empty for a unix socket. IPv6 hosts without brackets."""
    unix_path: str | None
    """The socket path of a ``unix://`` URL, else None."""
    db: int
    """Database index (always 0 on a cluster)."""
    username: str | None
    """ACL user of the data nodes (None: the default user)."""
    password: str | None
    """Password of the data nodes (None: no AUTH)."""
    tls: bool
    """True for the ``rediss`` schemes (also for the sentinels)."""
    ssl_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """The TLS options given, as redis-py's keyword arguments (``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs``,
    ``ssl_check_hostname``, ``ssl_min_version``, ``ssl_ca_path``): what an
    ``SSLConnection`` takes. Empty without TLS. Read-only."""
    master_name: str | None = None
    """The Sentinel master's name (sentinel only)."""
    sentinel_username: str | None = None
    """ACL user for the sentinels themselves (sentinel only; None: none)."""
    sentinel_password: str | None = None
    """Password for the sentinels themselves (sentinel only; None: no AUTH)."""
    url: str = field(default="", compare=False)
    """The URL as given. It holds the password: never print it (use ``redacted()``)."""

    @property
    def ssl_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's ``Redis`` and ``RedisCluster``:
        ``{"ssl": True, **ssl_options}`` with TLS, ``{}`` without."""
        return {"ssl": True, **self.ssl_options} if self.tls else {}

    def redacted(self) -> str:
        """The URL, canonical (default ports written out), with every secret as ``***``."""
        auth = ""
        if self.username is not None or self.password is not None:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{MASK}@" if self.password is not None else f"{user}@"
        query = self._query()
        if self.unix_path is not None:
            db = [("db", str(self.db))] if self.db else []
            return f"unix://{auth}{quote(self.unix_path)}{_join_query(db + query)}"
        hosts = ",".join(_netloc(host, port) for host, port in self.nodes)
        path = ""
        if self.topology == "standalone":
            path = f"/{self.db}"
        elif self.topology == "sentinel":
            path = f"/{quote(self.master_name or '', safe='')}/{self.db}"
        return f"{self.scheme}://{auth}{hosts}{path}{_join_query(query)}"

    def _query(self) -> list[tuple[str, str]]:
        query: list[tuple[str, str]] = []
        if self.sentinel_username is not None:
            query.append(("sentinel_username", self.sentinel_username))
        if self.sentinel_password is not None:
            query.append(("sentinel_password", MASK))
        for name, value in self.ssl_options.items():
            query.append((name, MASK if name == "ssl_password" else _query_value(value)))
        return query

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for connections to the sentinels (redis-py's
        ``Sentinel(sentinel_kwargs=...)``): their own user and password, and TLS."""
        found: dict[str, Any] = dict(self.ssl_kwargs)
        if self.sentinel_username is not None:
            found["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            found["password"] = self.sentinel_password
        return found

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"RedisTarget({self.redacted()!r})"


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ssl.TLSVersion):
        return value.name
    return str(value)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _join_query(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "?" + "&".join(f"{k}={quote(v, safe='*/:')}" for k, v in pairs)


# -- parsing --------------------------------------------------------------------------


class _Invalid(Exception):
    """A reason (the end of a sentence) why the URL is invalid."""


def parse_url(url: str) -> RedisTarget:
    """Parse and validate a Redis URL (see the module docstring for the grammar).

    Raises:
        ConfigurationError: one sentence naming what is wrong, with the URL redacted.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"invalid Redis URL: it must be a str, got {type(url).__name__}")
    try:
        return _parse(url)
    except _Invalid as exc:
        raise ConfigurationError(f"invalid Redis URL {redact(url)!r}: {exc}.") from None


def _parse(url: str) -> RedisTarget:
    if not isinstance(url, str) or "://" not in url:
        raise _Invalid(f"it must start with one of {_scheme_list()}")
    scheme = url.partition("://")[0].lower()
    if scheme not in _SCHEMES:
        raise _Invalid(f"unknown scheme {scheme + '://'!r}; use one of {_scheme_list()}")
    if any(ch.isspace() for ch in url):
        raise _Invalid("it contains whitespace")
    try:
        parts = urlsplit(url)
    except ValueError:  # unbalanced or invalid [IPv6] brackets; its text may echo the URL
        raise _Invalid("a host in [brackets] is not a valid [IPv6]:port address") from None
    if parts.fragment or url.endswith("#"):
        raise _Invalid("it contains '#' (percent-encode it as %23 in a password)")
    if "@" in parts.path:
        raise _Invalid("a '/' in a user name or password must be percent-encoded as %2F")
    topology, tls = _SCHEMES[scheme]
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo) if "@" in parts.netloc else (None, None)
    params = _query(parts.query)
    _check_params(scheme, topology, tls, params)
    common: dict[str, Any] = {
        "scheme": scheme,
        "topology": topology,
        "username": username,
        "password": password,
        "tls": tls,
        "ssl_options": MappingProxyType(_ssl_options(params) if tls else {}),
        "url": url,
    }
    if scheme == "unix":
        return _unix(hostinfo, parts.path, params, common)
    if topology == "cluster":
        return _cluster(hostinfo, parts.path, common)
    if topology == "sentinel":
        return _sentinel(hostinfo, parts.path, params, common)
    return _standalone(hostinfo, parts.path, common)


def _scheme_list() -> str:
    return ", ".join(f"{s}://" for s in _SCHEMES)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _query(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if not text:
        return params
    try:  # "+" is a plus sign, as in the user info: a generated password has them
        pairs = parse_qsl(text.replace("+", "%2B"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise _Invalid("its query string is not name=value pairs joined by '&'") from None
    for name, value in pairs:
        if name in params:
            raise _Invalid(f"the query parameter {name!r} is given twice")
        params[name] = value
    return params


def _check_params(scheme: str, topology: Topology, tls: bool, params: Mapping[str, str]) -> None:
    allowed: set[str] = set()
    if tls:
        allowed |= _TLS_PARAMS
    if topology == "sentinel":
        allowed |= _SENTINEL_PARAMS
    if scheme == "unix":
        allowed.add("db")
    for name in params:
        if name in allowed:
            continue
        if name in _TLS_PARAMS:
            raise _Invalid(f"the TLS option {name!r} needs a rediss scheme")
        if name in _SENTINEL_PARAMS:
            raise _Invalid(f"{name!r} only applies to redis+sentinel:// and rediss+sentinel://")
        if name == "db":
            raise _Invalid("give the database as the path (redis://host:6379/2), not as ?db=")
        known = ", ".join(sorted(allowed)) or "none for this scheme"
        raise _Invalid(f"unknown query parameter {name!r} (known: {known})")


def _ssl_options(params: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password"):
        if name in params:
            if not params[name]:
                raise _Invalid(f"{name} is empty")
            found[name] = params[name]
    if "ssl_keyfile" in found and "ssl_certfile" not in found:
        raise _Invalid("ssl_keyfile needs ssl_certfile (the client certificate)")
    reqs = params.get("ssl_cert_reqs")
    if reqs is not None:
        found["ssl_cert_reqs"] = _choice("ssl_cert_reqs", reqs.lower(), _CERT_REQS)
    check = params.get("ssl_check_hostname")
    if check is not None:
        found["ssl_check_hostname"] = _boolean("ssl_check_hostname", check)
    if found.get("ssl_cert_reqs") == "none":
        if found.get("ssl_check_hostname"):
            raise _Invalid("ssl_check_hostname=true cannot be used with ssl_cert_reqs=none")
        found["ssl_check_hostname"] = False
    version = params.get("ssl_min_version")
    if version is not None:
        name = _choice("ssl_min_version", version, tuple(_TLS_VERSIONS))
        found["ssl_min_version"] = _TLS_VERSIONS[name]
    return found


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _Invalid(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _boolean(name: str, value: str) -> bool:
    found = _BOOLEANS.get(value.lower())
    if found is None:
        raise _Invalid(f"{name} must be true or false, not {value!r}")
    return found


def _db(text: str, where: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _Invalid(f"the database {where} must be a non-negative integer, not {text!r}")
    return int(text)


def _nodes(hostinfo: str, default_port: int, *, many: bool) -> tuple[tuple[str, int], ...]:
    if not hostinfo:
        raise _Invalid("it names no host")
    items = hostinfo.split(",")
    if len(items) > 1 and not many:
        raise _Invalid("it names several hosts; use redis+cluster:// or redis+sentinel://")
    return tuple(_node(item, default_port) for item in items)


def _node(text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise _Invalid("its host list has an empty entry")
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        if end < 0 or not _IPV6.match(host) or (rest and not rest.startswith(":")):
            raise _Invalid(f"the host {text!r} is not a valid [IPv6]:port address")
        return host, _port(rest[1:]) if rest else default_port
    host, colon, port_text = text.partition(":")
    if ":" in port_text:
        raise _Invalid(f"the host {text!r} has several ':'; write IPv6 addresses as [::1]:6379")
    if not _HOST.match(host):
        raise _Invalid(f"the host {host!r} is not a valid host name or address")
    return host, _port(port_text) if colon else default_port


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        # Not echoed: in "redis://user:secret" (no "@HOST") the "port" is a password.
        raise _Invalid("the port after ':' is not a number (a password needs '@HOST' after it)")
    if not 1 <= int(text) <= 65535:
        raise _Invalid(f"the port {text} is not from 1 to 65535")
    return int(text)


def _unix(
    hostinfo: str, path: str, params: Mapping[str, str], common: dict[str, Any]
) -> RedisTarget:
    if hostinfo:
        raise _Invalid("a unix socket path must be absolute: unix:///path/to/redis.sock")
    socket_path = unquote(path)
    if not socket_path.startswith("/") or socket_path == "/":
        raise _Invalid("it names no socket path: unix:///path/to/redis.sock")
    db = _db(params["db"], "(db=)") if "db" in params else 0
    return RedisTarget(nodes=(), unix_path=socket_path, db=db, **common)


def _standalone(hostinfo: str, path: str, common: dict[str, Any]) -> RedisTarget:
    nodes = _nodes(hostinfo, DEFAULT_PORT, many=False)
    db = 0
    if path not in ("", "/"):
        db = _db(path[1:], "in the path")
    return RedisTarget(nodes=nodes, unix_path=None, db=db, **common)


def _cluster(hostinfo: str, path: str, common: dict[str, Any]) -> RedisTarget:
    nodes = _nodes(hostinfo, DEFAULT_PORT, many=True)
    if path not in ("", "/"):
        raise _Invalid("a cluster URL takes no database (Redis Cluster has only database 0)")
    return RedisTarget(nodes=nodes, unix_path=None, db=0, **common)


def _sentinel(
    hostinfo: str, path: str, params: Mapping[str, str], common: dict[str, Any]
) -> RedisTarget:
    nodes = _nodes(hostinfo, DEFAULT_SENTINEL_PORT, many=True)
    parts = path.split("/")[1:] if path else []
    if not parts or not parts[0]:
        raise _Invalid("a sentinel URL needs the master's name: redis+sentinel://host:26379/NAME")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        raise _Invalid("its path must be /MASTER_NAME or /MASTER_NAME/DB")
    db = _db(parts[1], "in the path") if len(parts) == 2 else 0
    return RedisTarget(
        nodes=nodes,
        unix_path=None,
        db=db,
        master_name=unquote(parts[0]),
        sentinel_username=_optional(params, "sentinel_username"),
        sentinel_password=_optional(params, "sentinel_password"),
        **common,
    )


def _optional(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    return value if value else None
