"""Dead letters of stream entries that name no usable job (hostile or hand-written)."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS
from taskrunner.job import ErrorInfo, raw_bytes, safe_text
from taskrunner.keys import QueueKeys
from taskrunner.logs import excerpt

logger = logging.getLogger("taskrunner.worker")

RAW_LIMIT = 1 << 20
"""Bytes of a hostile entry kept (base64) with its dead letter."""
MAX_ID = 256
"""Longest job id a dead letter of a hostile entry is named after."""


async def dead_letter_entry(
    redis: Redis,
    env: scripts.Env,
    keys: QueueKeys,
    stream: str,
    entry_id: str,
    fields: dict[str, str],
    why: str,
    job_id: str | None,
) -> None:
    """Dead-letter an entry that names no usable job, with its raw fields kept
    (orphan.lua: one step; until then the entry stays pending, so it is retried)."""
    raw = raw_bytes(repr(fields), RAW_LIMIT)
    reason = f"stream entry {entry_id} {why}: {excerpt(fields)}"
    error = ErrorInfo(type="DeadLetter", message=safe_text(reason), raw=raw).model_dump_json()
    # Named after the job it names when that is a usable id, else after the entry.
    name = job_id if job_id and len(job_id) <= MAX_ID else f"entry-{entry_id}"
    logger.error(
        "dead-lettering %s of queue %s: %s", excerpt(name), keys.queue, safe_text(reason, 300)
    )
    task = safe_text(fields.get("task", ""), 200)
    call = scripts.orphan(env, keys, stream, entry_id, name, task, error)
    try:
        await scripts.run(redis, call)
    except REDIS_ERRORS as exc:
        logger.warning("could not dead-letter stream entry %s (%s)", entry_id, excerpt(str(exc)))
