"""``taskrunner worker --reload`` in a real terminal: Ctrl-C is one graceful stop.

The command runs in a pseudo-terminal as the session leader and foreground process
group, as in a shell; the test types the terminal's interrupt character (^C), so the
kernel sends SIGINT to the foreground process group, exactly as a person's Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil
import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis

from taskrunner import JobStatus, TaskRunner
from taskrunner.keys import QueueKeys

TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))
DEADLINE = 60.0

APP = """
import os

import anyio

from taskrunner import TaskRunner

tr = TaskRunner(namespace=os.environ["TEST_NAMESPACE"], heartbeat_interval=0.2, stale_after=30)


@tr.task(name="sleepy", max_retries=0)
async def sleepy(seconds: float, marker: str) -> float:
    await anyio.Path(marker).touch()
    await anyio.sleep(seconds)
    return seconds
"""


@dataclass
class Terminal:
    """A command running in a pseudo-terminal; everything it writes is collected."""

    pid: int
    fd: int
    chunks: list[bytes] = field(default_factory=list)

    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def read_forever(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                return
            if not data:
                return
            self.chunks.append(data)

    def interrupt(self) -> None:
        """Type the terminal's interrupt character (^C by default)."""
        char = termios.tcgetattr(self.fd)[6][termios.VINTR]
        os.write(self.fd, char if isinstance(char, bytes) else bytes([char]))

    def exit_status(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        return None


@pytest.fixture
def terminal(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Terminal]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "ttyapp.py").write_text(APP)
    env = subprocess_env(redis_url, namespace)
    env["PYTHONPATH"] = os.pathsep.join([str(project), env["PYTHONPATH"]])
    argv = [TASKRUNNER, "worker", "ttyapp:tr", "--reload", "--grace-period", "30"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader with the pty as controlling terminal
        os.chdir(project)
        os.execve(TASKRUNNER, argv, env)
    term = Terminal(pid, fd)
    reader = threading.Thread(target=term.read_forever, daemon=True)
    reader.start()
    yield term
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    os.close(fd)
    reader.join(timeout=5)


async def test_ctrl_c_in_a_terminal_is_one_graceful_stop(
    terminal: Terminal, redis_url: str, namespace: str, redis: Redis, tmp_path: Path
) -> None:
    async def ready() -> bool:
        return " ready: " in terminal.output()

    await wait_until(ready, DEADLINE, interval=0.05)
    keys = QueueKeys(namespace, "default")

    async def registered() -> bool:
        return await redis.zcard(keys.workers) == 1

    await wait_until(registered, DEADLINE, interval=0.05)
    marker = tmp_path / "started"
    tr = TaskRunner(redis_url, namespace=namespace)

    @tr.task(name="sleepy")
    async def sleepy(seconds: float, marker: str) -> float:
        raise NotImplementedError

    async with tr:
        job = await sleepy.enqueue(2.0, str(marker))
        await wait_until(lambda: anyio.Path(marker).exists(), DEADLINE)
        terminal.interrupt()
        code = await anyio.to_thread.run_sync(terminal.exit_status, DEADLINE)
        output = terminal.output()
        assert code == 0, output
        assert output.count("stopping gracefully") == 1, output
        assert "second signal" not in output, output
        # The running job finished within the grace period; the worker deregistered.
        assert await job.status() == JobStatus.SUCCEEDED, output
        assert await job.result(timeout=1) == 2.0
        assert await redis.zcard(keys.workers) == 0, output
        assert (await redis.xpending(keys.stream, "taskrunner"))["pending"] == 0


async def test_sigkilled_reloader_leaves_no_worker_behind(
    terminal: Terminal, redis: Redis, namespace: str
) -> None:
    async def ready() -> bool:
        return " ready: " in terminal.output()

    await wait_until(ready, DEADLINE, interval=0.05)
    workers = psutil.Process(terminal.pid).children(recursive=True)
    assert workers
    os.kill(terminal.pid, signal.SIGKILL)

    async def gone() -> bool:
        return not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)

    await wait_until(gone, DEADLINE, interval=0.05)
    assert await redis.zcard(QueueKeys(namespace, "default").workers) == 0
