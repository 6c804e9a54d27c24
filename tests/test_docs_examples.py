"""The programs of the user guide run, and print what the guide says they print.

Each example under docs/examples is run as its reader would run it, in a fresh
interpreter, and its whole output is checked line by line, so that neither the
code nor the prose around it can drift from what the library does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
GUIDE = ROOT / "docs" / "guide.md"
README = ROOT / "README.md"

# Not a program: the worker functions that the examples import.
SUPPORT = {"workers.py"}

PID = r"\d+"
FD = r"\d+"

# Every line each example prints, as regular expressions, in order.
EXPECTED: dict[str, list[str]] = {
    "hello.py": [
        rf"template {PID} is ready",
        rf"child (?P<child>{PID}) sent: hello world, from process (?P=child)",
        rf"child {PID} exited with status 0",
    ],
    "prepare.py": [
        r"the child is called report\(sock, \*queued, \*args, \*fds\):",
        r"  0: 'a'",
        rf"  1: {FD}",
        r"  2: b'b'",
        r"  3: \{'k': 1\}",
        r"  4: 'c'",
        rf"  5: {FD}",
        r"read from a pipe: HELLO through the descriptor at position 1",
        r"read from a pipe: HELLO through the descriptor at position 5",
    ],
    "exit_statuses.py": [
        r"returned:             0",
        r"while running:        None",
        r"sys.exit\(3\):          3",
        r"raised:               1",
        r"signal.SIGUSR1:       -10",
        r"kill\(\):               -9 \(SIGKILL\)",
    ],
    "async_target.py": [
        r"HELLO \(from trio\)",
        r"STRUCTURED \(from trio\)",
        r"CONCURRENCY \(from trio\)",
        r"exit status 0",
    ],
    "fork_templates.py": [
        rf"base is (?P<base>{PID}), formal is (?P<formal>{PID})",
        r"  child of (?P=base): hello, \('from base', 'from spawn'\)",
        r"  child of (?P=formal): good day, \('from base', 'from formal', 'from spawn'\)",
    ],
    "lifetimes.py": [
        r"cancelled: the child was killed, status -9",
        r"  worker: SIGTERM, cleaning up before exiting",
        r"cancelled with deliver_cancel: status 0",
        r"something went wrong here: the child was killed, status -9",
    ],
    "errors.py": [
        r"type_name: 'NameError'",
        r"message: \"name 'load' is not defined\"",
        r"str\(\):",
        r"NameError: name 'load' is not defined",
        r"",
        r"Remote traceback:",
        r"Traceback \(most recent call last\):",
        r"(  .*\n)*?  File \"<trio_fork eval #1>\", line 1, in <module>",
        r"    settings = load\(\)(\n *\^+)?",  # Python 3.11 and later point at the error
        # Python 3.13 and later add a suggestion (here "Did you mean: 'float'?").
        r"NameError: name 'load' is not defined(\. Did you mean: .*\?)?",
        r"spawn: AttributeError: module 'workers' has no attribute 'no_such_function'",
        r"spawn\(lambda\): TypeError: target .*<lambda>.* cannot be found by name in another "
        r"process: .*",
        rf"BrokenTemplateError: template {PID} died or its channel broke",
    ],
    # Sorted: the workers serve the connections in whatever order they accept them.
    "prefork_server.py": [rf"worker {n} \(pid {PID}\) says hi" for n in range(3)],
    "run_programs.py": [
        r"\['echo', 'hello from echo'\]: b'hello from echo\\n', status 0",
        r"yes \| head -n 2: b'y\\ny\\n', stderr b''",
        r"FileNotFoundError: No such file or directory: 'no-such-program'",
        rf"tr, a child of the template \({PID}\): b'THROUGH A PIPE'",
        r"tr exited with status 0",
    ],
    "asyncio_example.py": [
        r"HELLO \(from asyncio\)",
        r"exit status 0",
        r"timed out: the child was killed, status -9",
    ],
}

# What each example may write to stderr (nothing, unless listed).
EXPECTED_STDERR: dict[str, list[str]] = {
    "exit_statuses.py": [
        r"Traceback \(most recent call last\):",
        r"(  .*\n)*?ZeroDivisionError: division by zero",
    ],
}


def run_program(path: Path) -> subprocess.CompletedProcess[str]:
    # Unbuffered, so that the parent's lines and its children's come out in the
    # order they were printed even though stdout is a pipe here.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        cwd=ROOT,
    )


def assert_lines(output: str, patterns: list[str], what: str) -> None:
    pattern = "\n".join(patterns) + "\n" if patterns else ""
    assert re.fullmatch(pattern, output), f"{what} does not match:\n{output}"


def examples() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SUPPORT)


@pytest.mark.parametrize("name", examples())
def test_example_prints_what_the_guide_shows(name: str) -> None:
    assert name in EXPECTED, f"docs/examples/{name} has no expected output in this test"
    result = run_program(EXAMPLES / name)
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    if name == "prefork_server.py":
        stdout = "".join(sorted(stdout.splitlines(keepends=True)))
    assert_lines(stdout, EXPECTED[name], f"stdout of {name}")
    assert_lines(result.stderr, EXPECTED_STDERR.get(name, []), f"stderr of {name}")


def test_every_example_is_in_the_guide() -> None:
    guide = GUIDE.read_text()
    included = set(re.findall(r"```\{literalinclude\} examples/(\S+)", guide))
    assert included == {*examples(), *SUPPORT}
    assert set(EXPECTED) == set(examples())


def test_readme_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example"
    program = tmp_path / "readme_example.py"
    program.write_text(blocks[0])
    result = run_program(program)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "b'hello world'\n0\n"
    assert result.stderr == ""


def test_outputs_shown_in_the_guide_are_real() -> None:
    shown = re.findall(
        r"```\{literalinclude\} examples/(\S+\.py)\n:language: python\n```\n\n```text\n(.*?)```",
        GUIDE.read_text(),
        re.DOTALL,
    )
    assert len(shown) >= 8
    for name, output in shown:
        assert_lines(output, EXPECTED[name], f"the output of {name} shown in the guide")
