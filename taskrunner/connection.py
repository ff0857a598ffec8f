"""Redis connections: redis-py's asyncio client with commands packed by hiredis.

redis-py's asyncio connection packs every command argument in Python (about 2 µs an
argument); a worker sends tens of arguments per job, so that alone cost more than
the rest of the hot path. hiredis (a core dependency through ``redis[hiredis]``)
packs a whole command in C; redis-py's synchronous client already uses it, and
this module gives the asyncio connection classes the same packer.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError, RedisError

REDIS_ERRORS = (RedisError, OSError)
"""What a Redis call can raise when the server is away, restarting, failing over or
refusing a write: service loops log these, back off and carry on."""

_fast_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


class _HiredisPacking:
    """Mixin: pack commands with ``hiredis.pack_command``."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # e.g. "CONFIG GET" is two words
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def _fast(base: type[AbstractConnection]) -> type[AbstractConnection]:
    found = _fast_classes.get(base)
    if found is None:
        found = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
        _fast_classes[base] = found
    return found


def connect(url: str, **options: Any) -> Redis:
    """A client for ``url`` (redis://, rediss://, unix://) whose connections pack
    commands with hiredis when it can (it always can with ``redis[hiredis]``)."""
    pool = ConnectionPool.from_url(url, **options)
    if hasattr(hiredis, "pack_command"):
        pool.connection_class = _fast(pool.connection_class)
    return Redis.from_pool(pool)  # the client owns (and closes) its pool
