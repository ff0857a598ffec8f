"""The Redis URL grammar (taskrunner.urls): parsing, validation and redaction.

Pure parsing: these tests need no Redis.
"""

from __future__ import annotations

import ssl

import pytest

from taskrunner import ConfigurationError
from taskrunner.urls import RedisTarget, parse_url, redact

SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize(
    ("url", "kind", "nodes", "db"),
    [
        ("redis://localhost", "standalone", (("localhost", 6379),), 0),
        ("redis://localhost:6380/2", "standalone", (("localhost", 6380),), 2),
        ("redis://127.0.0.1:6379/", "standalone", (("127.0.0.1", 6379),), 0),
        ("rediss://redis.example.com:6380/15", "standalone", (("redis.example.com", 6380),), 15),
        ("redis://[::1]:7000/1", "standalone", (("::1", 7000),), 1),
        ("REDIS://Host_1", "standalone", (("Host_1", 6379),), 0),
        ("redis+cluster://a:7000", "cluster", (("a", 7000),), 0),
        ("redis+cluster://a:7000,b:7001,[::1]:7002/", "cluster",
         (("a", 7000), ("b", 7001), ("::1", 7002)), 0),
        ("rediss+cluster://a", "cluster", (("a", 6379),), 0),
        ("redis+sentinel://s1:26379,s2:26380/mymaster", "sentinel",
         (("s1", 26379), ("s2", 26380)), 0),
        ("redis+sentinel://s1/mymaster/3", "sentinel", (("s1", 26379),), 3),
        ("rediss+sentinel://s1:5000/my%2Fmaster", "sentinel", (("s1", 5000),), 0),
    ],
)  # fmt: skip
def test_valid_urls_parse_into_a_target(
    url: str, kind: str, nodes: tuple[tuple[str, int], ...], db: int
) -> None:
    target = parse_url(url)
    assert target.topology == kind
    assert target.nodes == nodes
    assert target.db == db
    assert target.unix_path is None
    assert target.tls == url.lower().startswith("rediss")
    assert target.password is None
    assert target.url == url  # as given (it may hold a password: never print it)
    assert parse_url(target.redacted()) == target  # the canonical form parses back


def test_credentials_are_percent_decoded() -> None:
    target = parse_url("redis://app%3Auser:p%40ss%2Fw%3Ard%23@h:6379/1")
    assert (target.username, target.password) == ("app:user", "p@ss/w:rd#")
    assert target.redacted() == "redis://app%3Auser:***@h:6379/1"
    assert parse_url("redis://:pw@h").username is None
    assert parse_url("redis://user@h").password is None
    assert parse_url("redis://user@h").redacted() == "redis://user@h:6379/0"


def test_unix_socket_url() -> None:
    target = parse_url(f"unix://:{SECRET}@/run/redis/redis.sock?db=4")
    assert (target.unix_path, target.db, target.nodes) == ("/run/redis/redis.sock", 4, ())
    assert target.password == SECRET
    assert target.redacted() == "unix://:***@/run/redis/redis.sock?db=4"
    assert parse_url("unix:///tmp/a%20b.sock").unix_path == "/tmp/a b.sock"


def test_sentinel_master_and_sentinel_credentials() -> None:
    url = (
        f"redis+sentinel://app:{SECRET}@s1:26379,s2:26379/mymaster/2"
        f"?sentinel_username=watcher&sentinel_password={SECRET}x"
    )
    target = parse_url(url)
    assert target.master_name == "mymaster"
    assert (target.username, target.password) == ("app", SECRET)
    assert (target.sentinel_username, target.sentinel_password) == ("watcher", SECRET + "x")
    assert target.sentinel_kwargs() == {"username": "watcher", "password": SECRET + "x"}
    assert SECRET not in target.redacted()
    assert target.redacted() == (
        "redis+sentinel://app:***@s1:26379,s2:26379/mymaster/2"
        "?sentinel_username=watcher&sentinel_password=***"
    )


def test_tls_options_become_redis_py_keyword_arguments() -> None:
    url = (
        "rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/etc/c.pem"
        f"&ssl_keyfile=/etc/k.pem&ssl_password={SECRET}&ssl_cert_reqs=optional"
        "&ssl_check_hostname=false&ssl_min_version=TLSv1_3&ssl_ca_path=/etc/cas"
    )
    target = parse_url(url)
    assert target.ssl_kwargs == {"ssl": True, **target.ssl_options}
    assert dict(target.ssl_options) == {
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_ca_path": "/etc/cas",
        "ssl_certfile": "/etc/c.pem",
        "ssl_keyfile": "/etc/k.pem",
        "ssl_password": SECRET,
        "ssl_cert_reqs": "optional",
        "ssl_check_hostname": False,
        "ssl_min_version": ssl.TLSVersion.TLSv1_3,
    }
    assert SECRET not in target.redacted()
    assert "ssl_password=***" in target.redacted()
    assert parse_url("rediss://h").ssl_kwargs == {"ssl": True}
    assert parse_url("redis://h").ssl_kwargs == {}
    assert dict(parse_url("redis://h").ssl_options) == {}
    # Not verifying the certificate cannot check the host name either.
    relaxed = parse_url("rediss://h?ssl_cert_reqs=none")
    assert relaxed.ssl_options["ssl_check_hostname"] is False
    sentinel = parse_url("rediss+sentinel://s/m?ssl_ca_certs=/ca.pem&sentinel_password=x")
    assert sentinel.sentinel_kwargs() == {"ssl": True, "ssl_ca_certs": "/ca.pem", "password": "x"}
    with pytest.raises(TypeError):
        target.ssl_options["ssl_password"] = "x"  # type: ignore[index]


def test_the_password_never_shows_in_repr_or_str() -> None:
    target = parse_url(f"redis+sentinel://u:{SECRET}@s/m?sentinel_password={SECRET}")
    for text in (repr(target), str(target), f"{target}", f"{target!r}", str([target])):
        assert SECRET not in text
        assert "***" in text
    assert isinstance(target, RedisTarget)
    assert target == parse_url(f"redis+sentinel://u:{SECRET}@s/m?sentinel_password={SECRET}")
    assert target != parse_url(f"redis+sentinel://u:{SECRET}x@s/m?sentinel_password={SECRET}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h:6379", "unknown scheme 'http://'"),
        (f"http://u:{SECRET}@h:6379", "unknown scheme"),
        ("notaurl", "must start with one of redis://"),
        ("", "must start with one of"),
        ("redis://", "names no host"),
        (f"redis://:{SECRET}@", "names no host"),
        ("redis://h:0", "the port 0 is not from 1 to 65535"),
        ("redis://h:65536", "the port 65536 is not from 1 to 65535"),
        ("redis://h:http", "not a number"),
        ("redis://h:", "not a number"),
        (f"redis://u:{SECRET}", "needs '@HOST'"),
        (f"redis://:{SECRET}@h:port/0", "not a number"),
        ("redis://h/x", "database in the path must be a non-negative integer, not 'x'"),
        ("redis://h/-1", "non-negative integer, not '-1'"),
        ("redis://h/1.5", "non-negative integer"),
        ("redis://h/0/1", "non-negative integer"),
        ("redis://h?db=2", "give the database as the path"),
        ("unix:///tmp/r.sock?db=x", "non-negative integer"),
        ("unix://tmp/r.sock", "must be absolute"),
        ("unix://", "names no socket path"),
        ("redis://a:1,b:2", "several hosts"),
        ("redis://bad host", "whitespace"),
        ("redis://h$st:1", "not a valid host name"),
        ("redis://::1:6379", "write IPv6 addresses as [::1]:6379"),
        ("redis://[zz]:1", "not a valid [IPv6]:port"),
        ("redis://[::1:1", "not a valid [IPv6]:port"),
        ("redis+cluster://", "names no host"),
        ("redis+cluster://a:1,,b:2", "empty entry"),
        ("redis+cluster://a:1/0", "takes no database"),
        ("redis+cluster://a:1/3", "takes no database"),
        ("redis+sentinel://s:26379", "needs the master's name"),
        ("redis+sentinel://s:26379/", "needs the master's name"),
        ("redis+sentinel://s/m/x", "non-negative integer"),
        ("redis+sentinel://s/m/1/2", "/MASTER_NAME or /MASTER_NAME/DB"),
        ("redis://h?foo=1", "unknown query parameter 'foo'"),
        ("rediss://h?ssl_ca_cert=/x", "unknown query parameter 'ssl_ca_cert'"),
        ("redis://h?ssl_ca_certs=/x", "needs a rediss scheme"),
        ("redis://h?sentinel_password=x", "only applies to redis+sentinel://"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of none, optional, required"),
        ("rediss://h?ssl_check_hostname=perhaps", "must be true or false"),
        ("rediss://h?ssl_cert_reqs=none&ssl_check_hostname=true", "cannot be used"),
        ("rediss://h?ssl_min_version=SSLv3", "ssl_min_version must be one of"),
        ("rediss://h?ssl_keyfile=/k.pem", "needs ssl_certfile"),
        ("rediss://h?ssl_ca_certs=", "is empty"),
        ("rediss://h?ssl_ca_certs=/a&ssl_ca_certs=/b", "given twice"),
        ("redis://h?x", "name=value pairs"),
        (f"redis://:pa#{SECRET}@h", "percent-encode it as %23"),
        (f"redis://:pa/{SECRET}@h/0", "percent-encoded as %2F"),
    ],
)
def test_invalid_url_is_one_sentence_with_the_url_redacted(url: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_url(url)
    message = str(caught.value)
    assert reason in message
    assert message.startswith(f"invalid Redis URL {redact(url)!r}: ")
    assert message.endswith(".")
    assert "\n" not in message
    assert SECRET not in message
    assert SECRET not in repr(caught.value)
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"rediss://user:{SECRET}@h", "rediss://user:***@h"),
        (f"url 'redis://u:{SECRET}@h/0' failed", "url 'redis://u:***@h/0' failed"),
        (f"redis://:p@{SECRET}@h", "redis://:***@h"),  # an unencoded @ in the password
        (f"redis://:pa/{SECRET}@h/0", "redis://:***@h/0"),
        (f"redis+cluster://:{SECRET}@a:1,b:2", "redis+cluster://:***@a:1,b:2"),
        (f"a=redis://:{SECRET}@h b=unix://:{SECRET}@/s", "a=redis://:***@h b=unix://:***@/s"),
        (f"redis+sentinel://s/m?sentinel_password={SECRET}&x=1", "redis+sentinel://s/m?sentinel_password=***&x=1"),
        (f"rediss://h?ssl_password={SECRET}", "rediss://h?ssl_password=***"),
        (f"redis://h?password={SECRET}", "redis://h?password=***"),
        (f"redis://u:{SECRET}", "redis://u:***"),
        (f"redis://u:{SECRET}/0", "redis://u:***/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h:6379", "redis://user@h:6379"),
        ("redis+cluster://a:1,b:2", "redis+cluster://a:1,b:2"),
        ("redis://[::1]:6379", "redis://[::1]:6379"),
        ("no url here: a:b@c", "no url here: a:b@c"),
    ],
)  # fmt: skip
def test_redact_hides_every_password_in_a_text(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(redact(text)) == expected
