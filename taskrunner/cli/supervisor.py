"""``taskrunner worker --processes N``: N worker processes under one supervisor.

The supervisor imports nothing of the app at run time and holds no Redis connection:
it starts N children (``python -m taskrunner.cli worker APP ... --processes 1``), each
in its own session so a terminal's Ctrl-C reaches only the supervisor, which then
forwards it once.

* A child that exits non-zero or is killed (OOM, SIGKILL, a crash) is restarted; one
  that keeps crashing right after start is restarted with a growing delay (up to 10s).
  Its unfinished jobs are reclaimed by the other workers once its leases go stale.
* A child that exits 0 (burst mode drained, or someone stopped it) is not restarted.
* A child that exits 2 (a configuration error: a bad setting or Redis URL, refused
  credentials, ...) is not restarted either, since every restart would fail the same
  way: the supervisor stops the other children and exits 2.
* SIGTERM or SIGINT is forwarded to every child, which stops reading and lets its
  running jobs finish within the grace period; a second signal is forwarded too, and
  the children exit at once. The supervisor exits when the last child has exited:
  0 if every child exited 0.
* With ``env``, the children get that environment; ``on_exit(pid)`` is called after
  each child exits (the metrics exporter clears its live gauges there).
* Each child watches its stdin, a pipe from the supervisor: if the supervisor dies
  (even by SIGKILL), the pipe closes and the child stops gracefully on its own.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import anyio
from anyio.abc import Process

logger = logging.getLogger("taskrunner.supervisor")

CONFIG_ERROR = 2
"""Exit code of a child whose configuration is wrong (see taskrunner.cli._common)."""
STABLE_AFTER = 10.0
"""A child that ran this long before crashing is restarted at once."""
MAX_BACKOFF = 10.0


class Supervisor:
    """Keeps ``processes`` copies of ``argv`` running until a signal or a clean exit."""

    def __init__(
        self,
        argv: Sequence[str],
        processes: int,
        *,
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.processes = processes
        self.env = env
        self.on_exit = on_exit
        self.children: dict[int, Process] = {}
        self.exit_codes: list[int] = []
        self._stopping = anyio.Event()
        self._signals_seen = 0

    async def run(self) -> int:
        """Run the children; return 0 when every child ended with 0, 2 when one had a
        configuration error, else 1."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._forward_signals)
            async with anyio.create_task_group() as children:
                for index in range(self.processes):
                    children.start_soon(self._keep_running, index)
            tg.cancel_scope.cancel()
        if CONFIG_ERROR in self.exit_codes:
            return CONFIG_ERROR
        return 0 if all(code == 0 for code in self.exit_codes) else 1

    def _stop_all(self, signum: signal.Signals) -> None:
        self._stopping.set()
        for process in list(self.children.values()):
            if process.returncode is None:
                process.send_signal(signum)

    async def _keep_running(self, index: int) -> None:
        crashes = 0
        while True:
            started = time.monotonic()
            code = await self._run_child(index)
            if self._stopping.is_set() or code == 0:
                self.exit_codes.append(code)
                return
            if code == CONFIG_ERROR:
                logger.error(
                    "worker process %d exited with code 2 (a configuration error): not "
                    "restarting it, stopping the others",
                    index,
                )
                self.exit_codes.append(code)
                self._stop_all(signal.SIGTERM)
                return
            crashes = 0 if time.monotonic() - started >= STABLE_AFTER else crashes + 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** (crashes - 1)) if crashes else 0.0
            logger.warning(
                "worker process %d exited with %s; restarting it in %.1fs",
                index,
                _describe(code),
                delay,
            )
            with anyio.move_on_after(delay):
                await self._stopping.wait()
            if self._stopping.is_set():
                self.exit_codes.append(code)
                return

    async def _run_child(self, index: int) -> int:
        process = await anyio.open_process(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=None,
            start_new_session=True,
            env=self.env,
        )
        self.children[index] = process
        logger.info("started worker process %d (pid %d)", index, process.pid)
        if self._stopping.is_set():  # a signal came while it was starting
            process.send_signal(signal.SIGTERM)
        try:
            with anyio.CancelScope(shield=True):
                code = await process.wait()
        finally:
            del self.children[index]
            if process.stdin is not None:
                await process.stdin.aclose()
        if self.on_exit is not None:
            self.on_exit(process.pid)
        return code

    async def _forward_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:  # a hang-up (terminal closed, reloader gone):
                    if not self._signals_seen:  # one graceful stop, never a second signal
                        self._signals_seen = 1
                        logger.info(
                            "received SIGHUP: stopping %d worker process(es)", self.processes
                        )
                        self._stop_all(signal.SIGTERM)
                    continue
                self._signals_seen += 1
                name = signal.Signals(signum).name
                if self._signals_seen == 1:
                    logger.info("received %s: stopping %d worker process(es)", name, self.processes)
                else:
                    logger.warning("received %s again: the workers exit now", name)
                self._stop_all(signal.Signals(signum))


def _describe(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def supervise(
    argv: Sequence[str],
    processes: int,
    *,
    env: Mapping[str, str] | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> int:
    """Run the supervisor in the foreground and return its exit code."""
    supervisor = Supervisor(argv, processes, env=env, on_exit=on_exit)
    code = 1

    async def main() -> None:
        nonlocal code
        code = await supervisor.run()

    anyio.run(main)
    return code
