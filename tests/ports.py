"""Loopback ports that no other process can take while a test uses them.

``redisproc.free_port()`` (bind port 0, read it, close) leaves a window: between the
moment the port is handed out and the moment a server binds it, anything else on the
machine (another test's redis-server, proxy or uvicorn) can bind it. A server that
needs seconds to start then fails with EADDRINUSE, or the test talks to the wrong
server. Two ways round it:

* ``listening_socket()``: the test binds and listens itself and hands the socket to
  the server (``start_uvicorn`` does, with ``--fd``). The port is held from before the
  server starts; connections made while it starts wait in the backlog.
* ``refused_port()``: a port where nothing listens (an unreachable server), held by a
  socket that is bound but not listening: a connect() to it is refused at once and
  nobody else can bind it while the test runs. (Checked on Linux: ECONNREFUSED, and
  EADDRINUSE for a second bind even with SO_REUSEADDR, because this socket does not set
  it.)

Our own servers (``taskrunner worker --metrics-port 0``, ``taskrunner dashboard --port
0``) let the OS pick the port and log it: tests read it from the log instead.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HOST = "127.0.0.1"


def listening_socket() -> socket.socket:
    """A TCP socket listening on a loopback port the kernel picked."""
    return socket.create_server((HOST, 0))


def start_uvicorn(app: str, **popen: Any) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m uvicorn APP`` serving a socket this process bound; (process, port).

    The socket is passed with ``--fd`` and this process's copy is closed, so the port is
    the server's alone: if uvicorn dies, connections to it are refused at once."""
    with listening_socket() as listener:
        port: int = listener.getsockname()[1]
        fd = listener.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--fd", str(fd)], pass_fds=[fd], **popen
        )
    return proc, port


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections until the block ends (bound, not
    listening; no SO_REUSEADDR, so no one else can bind it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((HOST, 0))
        yield holder.getsockname()[1]
