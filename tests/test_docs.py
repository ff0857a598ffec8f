"""Every page of README.md and docs/: its code runs (tests/docsrun.py), its tables render.

A new page under docs/ is picked up by itself; mark a block that cannot run with
``<!-- docs: skip REASON -->`` (see the top of docs/index.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docsrun import Block, DocsError, check_install, commands, directive, parse
from redisproc import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNER = Path(__file__).resolve().parent / "docsrun.py"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_of_the_page_runs(page: Path, tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis") as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUNNER_")}
        env["TASKRUNNER_REDIS_URL"] = server.url
        cwd = tmp_path / "reader"
        cwd.mkdir()
        done = subprocess.run(
            [sys.executable, str(RUNNER), str(page), str(cwd)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


# -- the runner itself ---------------------------------------------------------------------------


def test_blocks_are_found_with_their_directive_even_when_indented() -> None:
    text = (
        "Intro.\n\n<!-- docs: skip needs your API key -->\n```python\nx = 1\n```\n\n"
        "!!! note\n    ```sh\n    taskrunner worker app.tasks:tr\n    ```\n\n```text\nout\n```\n"
    )
    blocks = parse(text)
    assert [(b.lang, b.line, b.directive) for b in blocks] == [
        ("python", 4, ("skip", "needs your API key")),
        ("sh", 9, None),
        ("text", 13, None),
    ]
    assert blocks[1].code == "taskrunner worker app.tasks:tr\n"


def test_shell_blocks_split_into_commands_with_their_environment() -> None:
    code = (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'   # install\n"
        "EMBED_WORKER=0 uvicorn examples.fastapi_app:app \\\n  --port 8001\n"
        "# a comment line\n"
    )
    found = [(c.env, c.argv) for c in commands(code, console=False)]
    assert found == [
        ({}, ["python3", "-m", "venv", ".venv"]),
        ({}, [".venv/bin/pip", "install", "-e", ".[dev]"]),
        ({"EMBED_WORKER": "0"}, ["uvicorn", "examples.fastapi_app:app", "--port", "8001"]),
    ]
    console = "$ taskrunner dead-letters myapp:tr   # list\nabc123  default  add\n"
    assert [c.argv for c in commands(console, console=True)] == [
        ["taskrunner", "dead-letters", "myapp:tr"]
    ]
    with pytest.raises(DocsError, match="pipes"):
        list(commands("taskrunner info myapp:tr | grep queued\n", console=False))


def test_installs_must_name_this_distribution_and_its_extras() -> None:
    check_install(["-e", ".[dev]"])
    check_install(["taskrunner-streams[fastapi]"])
    with pytest.raises(DocsError, match="distribution is taskrunner-streams"):
        check_install(["taskrunner[fastapi]"])
    with pytest.raises(DocsError, match="no extra 'fastapy'"):
        check_install(["taskrunner-streams[fastapy]"])


def test_a_skip_needs_a_reason_and_a_file_block_must_match_the_file() -> None:
    page = ROOT / "README.md"
    with pytest.raises(DocsError, match="needs a reason"):
        directive(page, Block("python", "x = 1\n", 1, ("skip", "")))
    quickstart = (ROOT / "examples" / "quickstart.py").read_text()
    assert directive(page, Block("python", quickstart, 1, ("file", "examples/quickstart.py")))
    with pytest.raises(DocsError, match="verbatim"):
        directive(page, Block("python", "x = 1\n", 1, ("file", "examples/quickstart.py")))
    with pytest.raises(DocsError, match=r"not a line of \.ci/run"):
        directive(page, Block("sh", "rm -rf /\n", 1, ("in-ci", "")))


# -- tables ---------------------------------------------------------------------------------------

DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def cells(row: str) -> int:
    """Cells of a table row: pipes inside code spans or escaped do not separate."""
    text = re.sub(r"`[^`]*`", "code", row.replace("\\|", "")).strip()
    return len(text.strip("|").split("|"))


def table_problems(text: str) -> list[str]:
    """Tables that would not render: rows in a paragraph, no delimiter row, ragged rows."""
    problems: list[str] = []
    paragraphs: list[list[tuple[int, str]]] = [[]]
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fence = None if fence and stripped.startswith(fence) else (fence or stripped[:3])
        if fence or not stripped:
            paragraphs.append([])
            continue
        paragraphs[-1].append((number, stripped))
    for paragraph in paragraphs:
        rows = [(n, line) for n, line in paragraph if line.startswith("|")]
        if not rows:
            continue
        first = paragraph[0][0]
        if len(rows) != len(paragraph):
            problems.append(f"line {rows[0][0]}: table rows share a paragraph with text")
        elif len(rows) < 2 or not DELIMITER.match(rows[1][1]):
            problems.append(f"line {first}: a table needs a header row and a delimiter row")
        else:
            width = cells(rows[0][1])
            problems += [
                f"line {n}: {cells(line)} cells, the header has {width}"
                for n, line in rows
                if cells(line) != width
            ]
    return problems


def test_the_table_check_finds_a_split_table() -> None:
    split = "| a | b |\n|---|---|\n| 1 | 2 |\nA paragraph.\n| 3 | 4 |\n"
    assert table_problems(split) == ["line 1: table rows share a paragraph with text"]
    assert table_problems("| a | b |\n|---|---|\n| `x | y` | 2 |\n") == []
    assert table_problems("| a | b |\n| 1 | 2 |\n") == [
        "line 1: a table needs a header row and a delimiter row"
    ]
    assert table_problems("| a | b |\n|---|---|\n| 1 |\n") == ["line 3: 1 cells, the header has 2"]
    assert table_problems("```\n| not | a table\n```\n") == []


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_table_renders(page: Path) -> None:
    assert table_problems(page.read_text()) == []
