"""Both type checkers over the typing contract: mypy --strict and pyright --strict.

``tests/typing_check.py`` must pass both and import every public name;
``tests/typing_errors.py`` must fail both on exactly the marked lines with the marked
error codes (a ``# E: mypy[...] pyright[...]`` comment marks the line after it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import taskrunner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECK = ROOT / "tests" / "typing_check.py"
ERRORS = ROOT / "tests" / "typing_errors.py"
MARK = re.compile(r"^\s*# E: mypy\[(?P<mypy>[^\]]*)\] pyright\[(?P<pyright>[^\]]*)\]\s*$")
MYPY_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")

Errors = dict[int, set[str]]


def expected_errors(checker: str) -> Errors:
    """Line number (1-based) -> codes, from the marks of typing_errors.py."""
    found: Errors = {}
    lines = ERRORS.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        mark = MARK.match(line)
        if mark:
            codes = {code.strip() for code in mark.group(checker).split(",") if code.strip()}
            found[number + 1] = codes
    return found


def run_mypy(path: Path) -> Errors:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    found: Errors = {}
    for line in done.stdout.splitlines():
        match = MYPY_LINE.match(line)
        if match:
            found.setdefault(int(match.group("line")), set()).add(match.group("code"))
        elif ": error:" in line:
            pytest.fail(f"mypy error without a code: {line}")
    return found


def run_pyright(*paths: Path) -> dict[Path, Errors]:
    done = subprocess.run(
        [str(BIN / "pyright"), "--pythonpath", sys.executable, "--outputjson"]
        + [str(p) for p in paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads(done.stdout)
    found: dict[Path, Errors] = {path: {} for path in paths}
    for diagnostic in report["generalDiagnostics"]:
        if diagnostic["severity"] != "error":
            continue
        errors = found.setdefault(Path(diagnostic["file"]), {})
        line = diagnostic["range"]["start"]["line"] + 1
        errors.setdefault(line, set()).add(diagnostic.get("rule", "error"))
    return found


@pytest.fixture(scope="module")
def pyright_errors() -> dict[Path, Errors]:
    return run_pyright(CHECK, ERRORS)


def test_the_error_file_marks_cases_for_both_checkers() -> None:
    mypy, pyright = expected_errors("mypy"), expected_errors("pyright")
    assert len(mypy) >= 15
    assert mypy.keys() == pyright.keys()
    assert all(mypy.values())
    assert all(pyright.values())


def test_the_typing_contract_passes_pyright_strict(pyright_errors: dict[Path, Errors]) -> None:
    assert pyright_errors[CHECK] == {}


def test_the_typing_contract_passes_mypy_strict() -> None:
    assert run_mypy(CHECK) == {}


def test_mypy_refuses_exactly_the_marked_lines() -> None:
    assert run_mypy(ERRORS) == expected_errors("mypy")


def test_pyright_refuses_exactly_the_marked_lines(pyright_errors: dict[Path, Errors]) -> None:
    assert pyright_errors[ERRORS] == expected_errors("pyright")


def test_the_typing_contract_covers_every_public_name() -> None:
    source = CHECK.read_text()
    block = re.search(r"from taskrunner import \((?P<names>[^)]*)\)", source)
    assert block is not None
    imported = {name.strip() for name in block.group("names").split(",") if name.strip()}
    missing = set(taskrunner.__all__) - imported
    assert not missing, f"add these public names to tests/typing_check.py: {sorted(missing)}"
    for name in taskrunner.__all__:
        uses = len(re.findall(rf"\b{re.escape(name)}\b", source))
        assert uses >= 2, f"tests/typing_check.py imports {name} but never uses it"
