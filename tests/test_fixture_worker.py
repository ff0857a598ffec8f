"""The CLI worker helper (tests/workerproc.py, ``cli_workers`` fixture): a real
``python -m taskrunner.cli worker`` process on the test's Redis, waited for by log
line, stopped by signal, killed with its children, output collected."""

from __future__ import annotations

import signal
from collections.abc import Callable

import psutil
import pytest
from apps.core_app import declare
from conftest import StartWorker, wait_until

from taskrunner import TaskRunner

APP = "apps.core_app:tr"
MakeRunner = Callable[..., TaskRunner]


async def test_a_worker_runs_jobs_and_stops_cleanly_on_sigterm(
    cli_workers: StartWorker, make_runner: MakeRunner
) -> None:
    worker = cli_workers(APP, "--concurrency", "4")
    await worker.ready()
    tr = make_runner()
    tasks = declare(tr)
    async with tr:
        job = await tasks.pid.enqueue()
        assert await job.result(timeout=30) == worker.pid
    worker.terminate()
    assert await worker.exited() == 0
    assert " ready: " in worker.output()


async def test_kill_takes_the_supervised_children_with_it(cli_workers: StartWorker) -> None:
    worker = cli_workers(APP, "--processes", "2")
    supervisor = psutil.Process(worker.pid)

    async def two_children() -> bool:
        return len(supervisor.children(recursive=True)) >= 2

    await wait_until(two_children, 30, interval=0.05)
    children = supervisor.children(recursive=True)
    worker.kill()
    assert worker.returncode == -signal.SIGKILL
    assert not any(child.is_running() for child in children)
    assert "the supervisor is gone" not in worker.output()  # killed, not left to notice


def test_wait_for_fails_with_the_output_when_the_worker_dies(cli_workers: StartWorker) -> None:
    worker = cli_workers("apps.core_app:not_a_runner")
    with pytest.raises(AssertionError, match=r"exited \(2\) early:\ntaskrunner: error: "):
        worker.wait_for("never printed", timeout=30)
