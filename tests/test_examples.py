"""Every example in examples/ runs as its docstring says, as real processes.

The commands are the indented lines of the docstring's ``::`` blocks, run in order from
the repository root with ``TASKRUNNER_REDIS_URL`` pointing at a clean test redis (so the
embedded server is not started). A ``taskrunner worker`` (without ``--burst``) or a
``uvicorn`` command is a server: it starts in the background and must report readiness;
every other command must exit 0. A server command that follows a finished command starts
a new scenario: the running servers are stopped first (SIGTERM: they must exit cleanly).
Commands of other programs (``curl`` with a placeholder) are documentation only.
"""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ports import listening_socket
from redis import Redis
from redisproc import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py")
BIN = Path(sys.executable).parent
PROGRAMS = {
    "python": [sys.executable],
    "taskrunner": [str(BIN / "taskrunner")],
    "uvicorn": [str(BIN / "uvicorn")],
}
READY = {"taskrunner": " ready: ", "uvicorn": "Application startup complete"}
DEADLINE = 90.0


@dataclass
class Command:
    text: str
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Command:
        words = shlex.split(text)
        env = {}
        while words and "=" in words[0] and not words[0].startswith("-"):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        return cls(text, env, words)

    @property
    def program(self) -> str:
        return self.argv[0] if self.argv else ""

    @property
    def runnable(self) -> bool:
        return self.program in PROGRAMS

    @property
    def is_server(self) -> bool:
        if self.program == "uvicorn":
            return True
        return self.argv[1:2] == ["worker"] and "--burst" not in self.argv


def docstring_commands(path: Path) -> list[Command]:
    """The indented lines of every ``::`` block of the module docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    found, in_block = [], False
    for line in doc.splitlines():
        if line.rstrip().endswith("::"):
            in_block = True
        elif in_block and line.startswith("    ") and line.strip():
            found.append(Command.parse(line.strip()))
        elif in_block and line.strip():
            in_block = False
    return found


def test_the_examples_the_docs_promise_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "fastapi_app", "retries_timeouts", "delayed_jobs"} <= names


def test_docstring_commands_are_parsed_with_their_environment() -> None:
    commands = [c for c in docstring_commands(ROOT / "examples" / "fastapi_app.py") if c.runnable]
    assert [c.text for c in commands] == [
        "uvicorn examples.fastapi_app:app",
        "python -m examples.fastapi_app",
        "EMBED_WORKER=0 uvicorn examples.fastapi_app:app",
        "taskrunner worker examples.fastapi_app:tr",
        "python -m examples.fastapi_app",
    ]
    assert [c.is_server for c in commands] == [True, False, True, True, False]
    assert commands[2].env == {"EMBED_WORKER": "0"}
    assert commands[2].argv == ["uvicorn", "examples.fastapi_app:app"]
    assert commands[0].env == {}


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("examples-redis")) as server:
        yield server


@pytest.fixture
def example_env(examples_server: RedisProcess) -> Iterator[dict[str, str]]:
    """The examples' environment. The test holds a listening socket for the whole test and
    every uvicorn of it serves that socket (``UVICORN_FD``, passed by ``Server``): a port
    merely picked free could be taken by another process while uvicorn starts, or between
    two uvicorns of one docstring. The demo clients find it in ``UVICORN_PORT``."""
    with Redis.from_url(examples_server.url) as client:
        client.flushall()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKRUNNER_", "UVICORN_"))}
    env["TASKRUNNER_REDIS_URL"] = examples_server.url
    env["PYTHONPATH"] = str(ROOT)
    with listening_socket() as listener:
        env["UVICORN_PORT"] = str(listener.getsockname()[1])
        env["UVICORN_FD"] = str(listener.fileno())
        yield env


def poll(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(0.05)


class Server:
    def __init__(self, command: Command, env: dict[str, str], log: Path) -> None:
        self.command = command
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            PROGRAMS[command.program] + command.argv[1:],
            env=env | command.env,
            cwd=ROOT,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=[int(env["UVICORN_FD"])] if command.program == "uvicorn" else [],
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> None:
        marker = READY[self.command.program]

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"`{self.command.text}` exited early:\n{self.output()}")
            return marker in self.output()

        poll(ready, f"`{self.command.text}` is ready")

    def stop(self) -> None:
        """SIGTERM; it must exit cleanly (uvicorn re-raises the signal after shutdown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        poll(lambda: self.proc.poll() is not None, f"`{self.command.text}` exits")
        clean = {0, -signal.SIGTERM} if self.command.program == "uvicorn" else {0}
        assert self.proc.returncode in clean, self.output()
        output = self.output()
        # A job that fails for good is logged with its task's traceback (if it has one)
        # once; any other traceback is a crash.
        assert output.count("Traceback") <= output.count(" failed for good"), output
        self._file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        self._file.close()


def run_client(command: Command, env: dict[str, str]) -> None:
    done = subprocess.run(
        PROGRAMS[command.program] + command.argv[1:],
        env=env | command.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, f"`{command.text}`:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_as_its_docstring_says(
    path: Path, example_env: dict[str, str], tmp_path: Path
) -> None:
    commands = [c for c in docstring_commands(path) if c.runnable]
    assert commands, f"{path.name}: its docstring shows no command to run"
    servers: list[Server] = []
    finished_since_start = False
    try:
        for index, command in enumerate(commands):
            if not command.is_server:
                run_client(command, example_env)
                finished_since_start = True
                continue
            if finished_since_start:
                while servers:
                    servers.pop().stop()
                finished_since_start = False
            servers.append(Server(command, example_env, tmp_path / f"server-{index}.log"))
            servers[-1].wait_ready()
        while servers:
            servers.pop().stop()
    finally:
        for server in servers:
            server.kill()
