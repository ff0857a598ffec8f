"""``taskrunner dashboard APP``: serve the web dashboard on its own (with uvicorn).

It needs the ``dashboard`` extra: ``pip install 'taskrunner-streams[dashboard]'``. It binds
127.0.0.1 by default and has no authentication of its own: to expose it, mount
``taskrunner.dashboard.dashboard(tr, auth=...)`` in your own app (docs/operations.md)
or put it behind a proxy that authenticates.
"""

from __future__ import annotations

import click

from taskrunner.cli._common import USAGE_ERROR, example, fail, load_app, settings_for

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
    uvicorn.run(
        build(runner, open_runner=True),
        host=host,
        port=port,
        log_level=settings.log_level,
        lifespan="on",
    )
