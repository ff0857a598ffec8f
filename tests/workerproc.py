"""``python -m taskrunner.cli worker APP`` as a real subprocess, for fault tests.

    worker = CliWorker("apps.core_app:tr", subprocess_env(url, ns), tmp_path / "w.log")
    worker.start("--concurrency", "4")
    await worker.logged(" ready: ")          # or worker.wait_for(" ready: ") in sync tests
    worker.kill()                            # SIGKILL it and its children
    code = await worker.exited()             # or worker.wait()
    worker.close()                           # always: kills what is left, closes the log

The worker runs in its own session, and ``kill()`` and ``close()`` also kill its
descendants (the ``--processes N`` children, which have sessions of their own). Output
goes to a file, read with ``output()``. The ``cli_workers`` fixture (conftest) starts
them on the test's Redis and namespace and closes them all after the test, printing
their output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import anyio
import psutil
from polling import poll_until

DEADLINE = 30.0


class CliWorker:
    """One ``taskrunner worker`` process (with its children, if any)."""

    def __init__(self, app: str, env: Mapping[str, str], log: Path, cwd: Path | None = None):
        self.app = app
        self.env = dict(env)
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._file: IO[bytes] | None = None

    def start(self, *args: str) -> CliWorker:
        if self.proc is not None:
            raise RuntimeError("the worker was already started")
        self._file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskrunner.cli", "worker", self.app, *args],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self._proc().pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the worker is not started")
        return self.proc

    # -- waiting -----------------------------------------------------------------------

    def _has(self, texts: tuple[str, ...]) -> bool:
        output = self.output()
        if any(text in output for text in texts):
            return True
        if not self.alive:
            raise AssertionError(f"worker exited ({self.returncode}) early:\n{output}")
        return False

    def wait_for(self, *texts: str, timeout: float = DEADLINE) -> None:
        """Block until the output has any of ``texts`` (fails if the worker exits first)."""
        poll_until(
            lambda: self._has(texts),
            timeout,
            f"worker log line {texts!r}",
            interval=0.05,
            details=self.output,
        )

    async def logged(self, *texts: str, timeout: float = DEADLINE) -> None:
        """Async ``wait_for``: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while not self._has(texts):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker log line {texts!r}: not within {timeout:g}s\n{self.output()}"
                )
            await anyio.sleep(0.05)

    async def ready(self, timeout: float = DEADLINE) -> None:
        await self.logged(" ready: ", timeout=timeout)

    def wait(self, timeout: float = DEADLINE) -> int:
        """Block until the worker exits; return its exit code (fails after ``timeout``)."""
        try:
            return self._proc().wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running after {timeout:g}s\n{self.output()}"
            ) from None

    async def exited(self, timeout: float = DEADLINE) -> int:
        deadline = time.monotonic() + timeout
        proc = self._proc()
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {proc.pid} still running after {timeout:g}s\n{self.output()}"
                )
            await anyio.sleep(0.05)
        return proc.returncode

    # -- signals -----------------------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker process only (its supervisor, with --processes)."""
        with contextlib.suppress(ProcessLookupError):
            self._proc().send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker and all its descendants (``--processes`` children run in
        sessions of their own); wait until they are gone. To kill the supervisor
        alone, use ``signal(signal.SIGKILL)``."""
        self._kill_tree(self._proc())

    def close(self) -> None:
        """Kill whatever is left of the worker and its children, close the log."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._kill_tree(self.proc)
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait(DEADLINE)
        psutil.wait_procs(family, timeout=DEADLINE)
