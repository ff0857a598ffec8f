"""Retries and timeouts: what happens to a task that fails, asks again, or runs too long.

Run a worker on the embedded default Redis::

    taskrunner worker examples.retries_timeouts:tr

Then, in a second shell from the same directory, enqueue the jobs and print each outcome::

    python -m examples.retries_timeouts

* ``flaky`` fails its first two attempts and succeeds on the third: any exception
  schedules a retry while ``max_retries`` allows (backoff ``retry_delay * 2**(n-1)``).
* ``polite`` raises ``Retry(delay=...)`` to ask for another attempt at a time it picks.
* ``stubborn`` always runs past its ``timeout``: every attempt is cancelled and counts
  as a failure; after ``max_retries`` it fails for good and ``result()`` raises
  ``JobFailed`` carrying the remote ``TaskTimeout``.
"""

from __future__ import annotations

import anyio

from taskrunner import JobFailed, Retry, TaskRunner, current_job

tr = TaskRunner(retry_delay=0.2)  # runner-wide default: every task may override it


@tr.task(max_retries=3)
async def flaky(service: str) -> str:
    attempt = current_job().attempt
    if attempt < 3:
        raise ConnectionError(f"{service} unavailable (attempt {attempt})")
    return f"{service} answered on attempt {attempt}"


@tr.task(max_retries=1)
async def polite(resource: str) -> str:
    if current_job().attempt == 1:
        raise Retry(delay=0.5)  # another attempt in 0.5s (counts towards max_retries)
    return f"{resource} was free on attempt {current_job().attempt}"


@tr.task(timeout=0.5, max_retries=1, retry_delay=0.1)
async def stubborn(seconds: float) -> None:
    await anyio.sleep(seconds)


async def main() -> None:
    async with tr:
        flaky_job = await flaky.enqueue("billing")
        polite_job = await polite.enqueue("printer")
        stubborn_job = await stubborn.enqueue(60)
        print("flaky:", await flaky_job.result(timeout=30))
        print("polite:", await polite_job.result(timeout=30))
        try:
            await stubborn_job.result(timeout=30)
        except JobFailed as exc:
            info = await stubborn_job.info()
            print(f"stubborn: failed for good after {info.attempts} attempts: {exc.exc_type}")
        else:
            raise SystemExit("stubborn should have timed out")


if __name__ == "__main__":
    anyio.run(main)
