"""Run every Python block and shell command of a Markdown page, in order, as a reader would.

Usage: ``python tests/docsrun.py PAGE.md`` (``tests/test_docs.py`` runs every page of
README.md and docs/ this way, each against its own redis-server). The marking convention
is described at the top of docs/index.md (in its source); in short:

* `` ```python `` blocks of a page run in one namespace, in order, as a notebook would:
  top-level ``await`` and ``async with`` work, on one event loop that also runs a worker
  (``tr.worker()``) for every ``TaskRunner`` with tasks in the namespace.
* `` ```sh ``/``bash``/``console`` blocks run command by command in a temporary
  directory holding ``examples/`` and the docs' sample app (``app/tasks.py``,
  ``myapp.py``, from tests/docs_apps/). ``taskrunner worker`` without ``--burst`` and
  ``uvicorn`` start in the background (they must report ready) and get SIGTERM when the
  page ends (they must then exit 0); every other command must exit 0.
* Installing is checked, not done: ``python3 -m venv DIR`` links DIR to the test venv;
  ``pip install ...`` must name this project's distribution (or ``.``) with extras it
  defines, whose requirements the test venv has; ``source DIR/bin/activate`` and
  ``export`` change the environment of the commands that follow. On a page that makes a
  venv, bare ``taskrunner``/``python`` are found only once the venv is activated.
* ``redis://localhost:6379/N`` in any block means the page's test server.
* An HTML comment right before a block changes what happens to it:
  ``<!-- docs: skip REASON -->`` (not run; the reason is required),
  ``<!-- docs: file PATH -->`` (the block must be the repository file PATH, verbatim),
  ``<!-- docs: in-ci -->`` (each command must be a line of .ci/run, which runs it).
Blocks in other languages (text, json, yaml, ...) are not run.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
APPS = Path(__file__).resolve().parent / "docs_apps"
DISTRIBUTION = "taskrunner-streams"
PYTHON = {"python", "py"}
SHELL = {"sh", "bash", "console", "shell"}
READY = {"taskrunner": " ready: ", "uvicorn": "Application startup complete"}
DEADLINE = 60.0
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs:\s*(?P<verb>[a-z-]+)\s*(?P<arg>.*?)\s*-->\s*$")
LOCAL_URL = re.compile(r"redis://localhost:6379/\d+")


class DocsError(AssertionError):
    """A block of the page failed; the message says which and why."""


@dataclass
class Block:
    lang: str
    code: str
    line: int
    """1-based line of the opening fence."""
    directive: tuple[str, str] | None = None

    def where(self, page: Path) -> str:
        return f"{page.name}:{self.line} ({self.lang} block)"


def parse(text: str) -> list[Block]:
    """The fenced blocks of a page, each with the directive comment right before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence = len(match.group("indent")), match.group("fence")
        info = match.group("info").strip()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end][indent:] if lines[end][:indent].isspace() else lines[end])
            end += 1
        lang = info.split()[0].lstrip(".{").rstrip("}") if info else ""
        blocks.append(Block(lang, "\n".join(body) + "\n", index + 1, _directive(lines, index)))
        index = end + 1
    return blocks


def _directive(lines: list[str], fence: int) -> tuple[str, str] | None:
    before = fence - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    if before < 0:
        return None
    found = DIRECTIVE.match(lines[before])
    return (found.group("verb"), found.group("arg")) if found else None


# -- shell commands ----------------------------------------------------------------------------


@dataclass
class Command:
    text: str
    env: dict[str, str]
    argv: list[str]


def commands(code: str, console: bool) -> Iterator[Command]:
    """Simple commands of a shell block: continuations joined, prompts and comments
    dropped, ``&&`` and ``;`` chains split, leading ``NAME=value`` taken as environment."""
    logical = code.replace("\\\n", " ")
    for raw in logical.splitlines():
        line = raw.strip()
        if console:
            if not line.startswith("$ "):
                continue  # output shown after the command
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        part: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", ";"):
                if part:
                    yield _command(part)
                part = []
            elif set(token) <= set(";&|<>"):
                raise DocsError(f"`{line}`: pipes and redirections are not supported")
            else:
                part.append(token)


def _command(words: list[str]) -> Command:
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return Command(shlex.join(words), env, words)


class Shell:
    """The environment and background servers of one page's shell commands."""

    def __init__(self, cwd: Path, env: dict[str, str], log_dir: Path) -> None:
        self.cwd = cwd
        self.env = env
        self.log_dir = log_dir
        self.servers: list[tuple[Command, subprocess.Popen[str], Path]] = []

    def run(self, command: Command) -> None:
        argv = command.argv
        if not argv:
            self.env.update(command.env)
            return
        name = Path(argv[0]).name
        if argv[:1] == ["export"]:
            for word in argv[1:]:
                key, _, value = word.partition("=")
                self.env[key] = LOCAL_URL.sub(os.environ["TASKRUNNER_REDIS_URL"], value)
        elif argv[:1] in (["source"], ["."]):
            self.activate(Path(argv[1]))
        elif name.startswith("python") and argv[1:3] == ["-m", "venv"]:
            self.make_venv(Path(argv[-1]))
        elif name == "pip" or (name.startswith("python") and argv[1:3] == ["-m", "pip"]):
            check_install(argv[argv.index("install") + 1 :] if "install" in argv else [])
        elif self.is_server(command):
            self.start(command)
        else:
            self.call(command)

    def activate(self, script: Path) -> None:
        bin_dir = (self.cwd / script).parent
        if not (bin_dir / "python").exists():
            raise DocsError(f"source {script}: no venv there")
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env['PATH']}"
        self.env["VIRTUAL_ENV"] = str(bin_dir.parent)

    def make_venv(self, target: Path) -> None:
        """The page's venv is the test venv (installing is checked, not done)."""
        link = self.cwd / target
        if not link.exists():
            link.symlink_to(Path(sys.prefix), target_is_directory=True)

    @staticmethod
    def is_server(command: Command) -> bool:
        name = Path(command.argv[0]).name
        if name == "uvicorn":
            return True
        worker = name == "taskrunner" and command.argv[1:2] == ["worker"]
        return worker and not {"--burst", "--help", "-h"} & set(command.argv)

    def executable(self, command: Command) -> list[str]:
        program = command.argv[0]
        if "/" in program:
            return [str(self.cwd / program), *command.argv[1:]]
        found = shutil.which(program, path=self.env["PATH"])
        if found is None:
            raise DocsError(f"`{command.text}`: {program} is not on PATH at this point")
        return [found, *command.argv[1:]]

    def call(self, command: Command) -> None:
        done = subprocess.run(
            self.executable(command),
            cwd=self.cwd,
            env=self.env | _urls(command.env),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        print(f"$ {command.text}\n{done.stdout}{done.stderr}", end="")
        if done.returncode != 0:
            raise DocsError(f"`{command.text}` exited with {done.returncode}")

    def start(self, command: Command) -> None:
        log = self.log_dir / f"server-{len(self.servers)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                self.executable(command),
                cwd=self.cwd,
                env=self.env | _urls(command.env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.servers.append((command, proc, log))
        marker = READY[Path(command.argv[0]).name]
        deadline = time.monotonic() + DEADLINE
        while marker not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DocsError(f"`{command.text}` did not get ready:\n{log.read_text()}")
            time.sleep(0.05)
        print(f"$ {command.text} &   (ready)")

    def stop(self, *, check: bool) -> None:
        """SIGTERM every server; each must exit cleanly (uvicorn re-raises the signal)."""
        problems = []
        for command, proc, log in reversed(self.servers):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            clean = proc.returncode in (0, -signal.SIGTERM)
            output = log.read_text()
            if check and (not clean or "Traceback" in output):
                problems.append(f"`{command.text}` exited with {proc.returncode}:\n{output}")
        self.servers.clear()
        if problems:
            raise DocsError("\n".join(problems))


def _urls(env: dict[str, str]) -> dict[str, str]:
    url = os.environ["TASKRUNNER_REDIS_URL"]
    return {key: LOCAL_URL.sub(url, value) for key, value in env.items()}


def check_install(args: list[str]) -> None:
    """``pip install [-e] SPEC...``: each SPEC must be this project with extras it defines,
    and the test venv must already satisfy what they require."""
    specs = [a for a in args if not a.startswith("-")]
    if not specs:
        raise DocsError(f"pip install {' '.join(args)}: installs nothing")
    for spec in specs:
        requirement = Requirement(re.sub(r"^\.", DISTRIBUTION, spec))
        if canonicalize_name(requirement.name) != canonicalize_name(DISTRIBUTION):
            raise DocsError(f"pip install {spec}: this project's distribution is {DISTRIBUTION}")
        for extra in requirement.extras:
            _check_extra(extra)
    print(f"$ pip install {' '.join(args)}   (checked: the test venv has it)")


def _check_extra(extra: str, seen: frozenset[str] = frozenset()) -> None:
    dist = importlib.metadata.distribution(DISTRIBUTION)
    if extra not in (dist.metadata.get_all("Provides-Extra") or []):
        raise DocsError(f"{DISTRIBUTION} has no extra {extra!r}")
    for line in dist.requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or "extra" not in str(marker) or not marker.evaluate({"extra": extra}):
            continue
        if canonicalize_name(requirement.name) == canonicalize_name(DISTRIBUTION):
            for inner in requirement.extras - seen:
                _check_extra(inner, seen | {extra})
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise DocsError(f"extra {extra!r} needs {requirement}, not installed") from None
        if not requirement.specifier.contains(version, prereleases=True):
            raise DocsError(f"extra {extra!r} needs {requirement}, found {version}")


# -- Python blocks -----------------------------------------------------------------------------


@dataclass
class Python:
    """One namespace and one event loop for the Python blocks of a page, with a worker
    for each TaskRunner that declares tasks."""

    namespace: dict[str, Any] = field(default_factory=lambda: _module().__dict__)
    runner: asyncio.Runner = field(default_factory=asyncio.Runner)
    workers: dict[int, Served] = field(default_factory=dict)

    def run(self, code: str, filename: str) -> None:
        """Run the block statement by statement: one with a top-level ``await`` runs on
        the page's loop, after a worker is started for each TaskRunner declared so far."""
        source = LOCAL_URL.sub(os.environ["TASKRUNNER_REDIS_URL"], code)
        tree = ast.parse(source, filename)
        for statement in tree.body:
            module = ast.Module(body=[statement], type_ignores=[])
            compiled = compile(
                module, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
            )
            if compiled.co_flags & inspect.CO_COROUTINE:
                self.runner.run(self._awaited(compiled))
            else:
                exec(compiled, self.namespace)  # the docs' own code

    async def _awaited(self, compiled: Any) -> None:
        await self._ensure_workers()
        coroutine = eval(compiled, self.namespace)  # the docs' own code
        await coroutine

    async def _ensure_workers(self) -> None:
        from taskrunner import TaskRunner

        for value in list(self.namespace.values()):
            if not isinstance(value, TaskRunner) or not value.registry:
                continue
            running = self.workers.get(id(value))
            if running is not None and running.queues == value.queues():
                continue
            if running is not None:
                await running.stop()
            self.workers[id(value)] = await Served.start(value)

    def close(self) -> None:
        async def stop_all() -> None:
            for running in self.workers.values():
                await running.stop()

        self.runner.run(stop_all())
        self.runner.close()


def _module() -> types.ModuleType:
    """The page's namespace, a registered module (pydantic resolves annotations there)."""
    module = sys.modules["__docs__"] = types.ModuleType("__docs__")
    return module


@dataclass
class Served:
    """A worker of one TaskRunner, running in the background of the page's event loop."""

    queues: list[str]
    task: asyncio.Task[None]
    stopping: asyncio.Event

    @classmethod
    async def start(cls, runner: Any) -> Served:
        started, stopping = asyncio.Event(), asyncio.Event()

        async def serve() -> None:
            async with runner.worker(handle_signals=False, grace_period=1.0):
                started.set()
                await stopping.wait()

        task = asyncio.create_task(serve())
        waiting = asyncio.create_task(started.wait())
        await asyncio.wait([task, waiting], timeout=DEADLINE, return_when="FIRST_COMPLETED")
        if not started.is_set():
            waiting.cancel()
            await task  # raises why it did not start
            raise DocsError("the background worker did not start")
        return cls(runner.queues(), task, stopping)

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, DEADLINE)


# -- a page ------------------------------------------------------------------------------------


def prepare(cwd: Path) -> None:
    """The reader's directory: the repository's examples/, the docs' sample app, and
    .venv (the test venv: what README's set-up, which CI runs itself, leaves behind)."""
    (cwd / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    (cwd / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    for item in APPS.iterdir():
        if item.name != "__pycache__":
            (cwd / item.name).symlink_to(item, target_is_directory=item.is_dir())


def base_env(makes_venv: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    path = env.get("PATH", "").split(os.pathsep)
    venv_bin = str(Path(sys.executable).parent)
    if makes_venv:  # the page must activate its venv (or name its bin/) to use it
        path = [p for p in path if p != venv_bin]
    elif venv_bin not in path:
        path.insert(0, venv_bin)
    env["PATH"] = os.pathsep.join(path)
    return env


def run_page(page: Path, cwd: Path) -> int:
    """Run the page's blocks in order; returns how many ran."""
    blocks = parse(page.read_text())
    makes_venv = any(
        b.lang in SHELL and re.search(r"-m venv\b", b.code) and not b.directive for b in blocks
    )
    prepare(cwd)
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    shell = Shell(cwd, base_env(makes_venv), cwd)
    python = Python()
    ran = 0
    try:
        for block in blocks:
            ran += run_block(page, block, shell, python)
        shell.stop(check=True)
    finally:
        shell.stop(check=False)
        python.close()
    return ran


def run_block(page: Path, block: Block, shell: Shell, python: Python) -> int:
    if block.lang not in PYTHON | SHELL:
        return 0
    try:
        if block.directive is not None:
            return directive(page, block)
        print(f"--- {block.where(page)}")
        if block.lang in PYTHON:
            python.run(block.code, f"{page.name}:{block.line}")
        else:
            for command in commands(block.code, console=block.lang == "console"):
                shell.run(command)
    except DocsError as exc:
        raise DocsError(f"{block.where(page)}: {exc}") from None
    except Exception:
        raise DocsError(f"{block.where(page)} raised:\n{traceback.format_exc()}") from None
    return 1


def directive(page: Path, block: Block) -> int:
    assert block.directive is not None
    verb, arg = block.directive
    if verb == "skip":
        if not arg:
            raise DocsError("`docs: skip` needs a reason")
        print(f"--- {block.where(page)}: skipped ({arg})")
        return 0
    if verb == "file":
        expected = (ROOT / arg).read_text()
        if block.code.strip() != expected.strip():
            raise DocsError(f"the block is not {arg} verbatim")
        return 1
    if verb == "in-ci":
        ci = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
        for line in block.code.strip().splitlines():
            if line.strip() not in ci:
                raise DocsError(f"`{line.strip()}` is not a line of .ci/run")
        return 1
    raise DocsError(f"unknown directive `docs: {verb}`")


def main(argv: list[str]) -> int:
    page, cwd = Path(argv[1]).resolve(), Path(argv[2]).resolve()
    try:
        ran = run_page(page, cwd)
    except DocsError as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    print(f"{page.name}: {ran} block(s) ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
