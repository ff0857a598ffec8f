"""``taskrunner worker --reload``: restart the worker when code changes, and stop it
with one graceful stop on Ctrl-C.

The worker runs as a child command in a session of its own, so a terminal's Ctrl-C
(SIGINT to the terminal's foreground process group) reaches only the reloader, which
forwards it once: the worker stops gracefully (running jobs finish within the grace
period or are handed back; it deregisters), and the reloader exits with the worker's
exit code. A second Ctrl-C (or SIGTERM) is forwarded too: the worker exits at once.

* A change to a ``.py`` file below the watched directory sends the worker SIGINT (a
  graceful stop), waits the grace period plus 5 s (then SIGKILL), and starts it again.
* A worker that exits on its own (a crash, a drained ``--burst``) is started again at
  the next change.
* The worker watches its stdin, a pipe from the reloader: if the reloader dies (even
  by SIGKILL), the pipe closes and the worker stops gracefully on its own.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import anyio
from anyio.abc import Process

logger = logging.getLogger("taskrunner.reload")

KILL_AFTER = 5.0
"""Seconds a stopping worker gets beyond its grace period before SIGKILL."""


class Reloader:
    """Runs ``argv`` and restarts it when a Python file below ``root`` changes."""

    def __init__(self, argv: Sequence[str], root: str, grace_period: float) -> None:
        self.argv = list(argv)
        self.root = root
        self.grace_period = grace_period
        self.child: Process | None = None
        self._stopping = anyio.Event()
        self._changed = anyio.Event()
        self._signals_seen = 0

    async def run(self) -> int:
        """Run until a signal stops the worker; return the worker's last exit code."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._forward_signals)
            tg.start_soon(self._watch)
            code = await self._run_children()
            tg.cancel_scope.cancel()
        return code

    async def _run_children(self) -> int:
        code = 0
        while not self._stopping.is_set():
            self._changed = anyio.Event()
            code = await self._run_child()
            if self._stopping.is_set():
                break
            if not self._changed.is_set():  # it ended by itself: wait for a fix
                logger.warning("the worker exited with code %d; restarting it on a change", code)
                await _first(self._changed, self._stopping)
        return code

    async def _run_child(self) -> int:
        process = await anyio.open_process(
            self.argv, stdin=subprocess.PIPE, stdout=None, stderr=None, start_new_session=True
        )
        self.child = process
        if self._stopping.is_set():  # a signal came while it was starting
            process.send_signal(signal.SIGTERM)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_change, process)
                with anyio.CancelScope(shield=True):
                    code = await process.wait()
                tg.cancel_scope.cancel()
        finally:
            self.child = None
            if process.stdin is not None:
                await process.stdin.aclose()
        return code

    async def _stop_on_change(self, process: Process) -> None:
        await self._changed.wait()
        if self._stopping.is_set() or process.returncode is not None:
            return
        process.send_signal(signal.SIGINT)
        with anyio.move_on_after(self.grace_period + KILL_AFTER):
            await process.wait()
            return
        logger.warning("the worker did not stop in time; killing it")
        process.kill()

    async def _watch(self) -> None:
        import watchfiles

        logger.info("watching %s for changes (--reload)", self.root)
        async for changes in watchfiles.awatch(
            self.root, watch_filter=watchfiles.PythonFilter(), stop_event=self._stopping
        ):
            paths = sorted({Path(p).name for _, p in changes})
            logger.info("detected changes in %s; restarting the worker", ", ".join(paths))
            self._changed.set()

    async def _forward_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self._signals_seen += 1
                name = signal.Signals(signum).name
                if self._signals_seen == 1:
                    logger.info("received %s: stopping the worker", name)
                else:
                    logger.warning("received %s again: the worker exits now", name)
                self._stopping.set()
                if self.child is not None and self.child.returncode is None:
                    self.child.send_signal(signal.Signals(signum))


async def _first(*events: anyio.Event) -> None:
    """Return when any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def reload(argv: Sequence[str], root: str, grace_period: float) -> int:
    """Run the reloader in the foreground and return its exit code."""
    reloader = Reloader(argv, root, grace_period)
    code = 1

    async def main() -> None:
        nonlocal code
        code = await reloader.run()

    anyio.run(main)
    return code
