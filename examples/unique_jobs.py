"""Unique jobs: one job per task and unique arguments, held by a TTL lock.

Run it (a worker runs in the same process; the embedded redis-server is used
unless ``TASKRUNNER_REDIS_URL`` is set)::

    python -m examples.unique_jobs

- ``rebuild`` (``until_executed``, unique by account only): a second enqueue while the
  first is waiting or running writes nothing and returns the first job's handle.
- ``sync_account`` (``while_executing`` + ``reschedule``): duplicates may queue up,
  but only one runs at a time; the others come back every ``reschedule_delay``.
- ``notify`` (``until_executing`` + ``raise``): a duplicate enqueue raises
  ``LockConflictError`` until the first one starts.
"""

from __future__ import annotations

import logging

import anyio

from taskrunner import LockConflictError, TaskRunner, current_job

tr = TaskRunner(namespace="examples-unique", lock_ttl=180)  # global default: 600 s


@tr.task(lock="while_executing", on_conflict="reschedule", reschedule_delay=0.2)
async def sync_account(account_id: int, full: bool = False) -> int:
    await anyio.sleep(0.5)  # slow: a duplicate meets the lock and is rescheduled
    return current_job().attempt


@tr.task(
    lock="until_executed", lock_ttl=3600, unique_args=lambda account_id, full=False: [account_id]
)
async def rebuild(account_id: int, full: bool = False) -> str:
    return f"rebuilt {account_id} (full={full})"


@tr.task(lock="until_executing", on_conflict="raise")
async def notify(user: str) -> None: ...


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    async with tr:
        first = await rebuild.enqueue(1, full=True)
        second = await rebuild.enqueue(1)  # same account: deduplicated
        print("rebuild deduplicated:", second.deduplicated, second.id == first.id)

        pending = await notify.options(delay=60).enqueue("ann")
        try:
            await notify.enqueue(user="ann")  # same arguments, bound by name
        except LockConflictError as exc:
            print("notify conflict: held by", exc.holder == pending.id)
        await pending.abort()  # aborting a waiting job releases its lock

        async with tr.worker(handle_signals=False):
            a = await sync_account.enqueue(7)
            b = await sync_account.enqueue(7, full=False)  # the same job, by default binding
            print("rebuild ->", await first.result(timeout=30))
            print("sync_account attempts ->", await a.result(timeout=30), await b.result(30))
            # whichever took the lock first ran; the other came back until it was free
            waits = [(await job.info()).reschedules for job in (a, b)]
            print("reschedules (a, b) ->", waits, "same ids:", [a.id, b.id])


if __name__ == "__main__":
    anyio.run(main)
