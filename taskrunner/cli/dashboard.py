"""``taskrunner dashboard APP``: serve the web dashboard on its own (with uvicorn).

It needs the ``dashboard`` extra: ``pip install 'taskrunner-streams[dashboard]'``. It binds
127.0.0.1 by default and has no authentication of its own: to expose it, mount
``taskrunner.dashboard.dashboard(tr, auth=...)`` in your own app (docs/operations.md)
or put it behind a proxy that authenticates.
"""

from __future__ import annotations

import logging
import socket

import click

from taskrunner.cli._common import (
    RUNTIME_ERROR,
    USAGE_ERROR,
    example,
    fail,
    load_app,
    run_async,
    settings_for,
)
from taskrunner.runner import TaskRunner

logger = logging.getLogger("uvicorn.error")  # uvicorn's own lines go there

EXAMPLE = """
taskrunner dashboard examples.quickstart:tr
taskrunner dashboard myapp:tr --port 8080 --host 0.0.0.0
"""


@click.command(
    "dashboard",
    help="Serve the web dashboard of APP (queues, jobs, dead letters, workers) on "
    "http://HOST:PORT/. It has no login: keep it on loopback, or mount it in your app "
    "behind its auth (docs/operations.md)." + example(EXAMPLE),
)
@click.argument("app")
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to bind; 0 picks a free port (the startup line names it).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
def dashboard(app: str, port: int, host: str) -> None:
    try:
        import uvicorn

        from taskrunner.dashboard import dashboard as build
    except ImportError as exc:
        fail(
            f"the dashboard needs the 'dashboard' extra ({exc}): "
            "pip install 'taskrunner-streams[dashboard]'",
            USAGE_ERROR,
        )
    runner = load_app(app)
    settings = settings_for({}, runner)
    run_async(lambda: _reachable(runner))  # an unreachable Redis: one line, as everywhere
    sockets = _listen(host, port)  # a port in use: one line, not uvicorn's exit 1 or 3

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.started:
                return
            for sock in sockets or []:  # uvicorn names no address of sockets it was given
                address, bound = sock.getsockname()[:2]
                shown = f"[{address}]" if ":" in address else address
                logger.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, bound)

    config = uvicorn.Config(
        build(runner, open_runner=True), log_level=settings.log_level, lifespan="on"
    )
    Server(config).run(sockets=sockets)


async def _reachable(runner: TaskRunner) -> None:
    async with runner:
        pass


def _listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address ``host`` resolves to (``localhost``: often ::1
    and 127.0.0.1, as uvicorn binds them), all on one port: the first one's when
    ``port`` is 0. Uvicorn listens on them."""
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, resolved in dict.fromkeys(found):
            address = resolved
            if sockets and port == 0:  # the others take the port the first one got
                address = (resolved[0], sockets[0].getsockname()[1], *resolved[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # its own address only, not the IPv4 ones too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", RUNTIME_ERROR)
    return sockets
