"""The pytest plugin, exercised by running small example suites in this process.

pytester runs them in-process, so their session templates are this process's children
and the leak check sees that each session ended its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import process_exists
from trio_fork import _isolated

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "testing"

WORKERS = """
import os, subprocess, sys

def report(sock):
    sock.sendall(repr((os.getpid(), os.getppid(), os.getcwd(), os.environ.get("SEEN"),
                       sorted(sys.modules))).encode())

def leave_an_orphan(sock):
    orphan = subprocess.Popen(["sleep", "60"])
    # Popen returns once the exec has begun; the new command line is there a moment
    # later (until then /proc shows an empty one).
    while True:
        with open(f"/proc/{orphan.pid}/cmdline", "rb") as file:
            if file.read():
                break
    sock.sendall(str(orphan.pid).encode())

def crash(sock):
    raise ValueError("a distinctive crash message")
"""

HELPERS = """
import ast, os

async def report(template):
    async with template.spawn("workers:report") as child:
        data = b"".join([chunk async for chunk in child.stream])
    return ast.literal_eval(data.decode())

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])

def record(name, *values):
    with open(name, "a") as file:
        print(*values, file=file)
"""

BOTH_BACKENDS = """
import pytest

@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param
"""

# The same tests, for each way of running async tests.
TESTS = """
import os
import pytest
from helpers import parent_of, record, report

@pytest.fixture
def seen(monkeypatch):
    # Set before fork_template: the template sees it, as open_template would.
    monkeypatch.setenv("SEEN", "yes")

async def test_a_template_of_its_own(seen, fork_template, trio_fork_session_template):
    assert parent_of(fork_template.pid) == trio_fork_session_template.pid
    child, parent, cwd, env, modules = await report(fork_template)
    assert (parent, cwd, env) == (fork_template.pid, os.getcwd(), "yes")
    assert "decimal" in modules and "fractions" not in modules
    await fork_template.eval("import fractions")
    record("pids.txt", trio_fork_session_template.pid, fork_template.pid)

@pytest.mark.trio_fork_preload("fractions")
async def test_preload_marker(fork_template):
    *_, modules = await report(fork_template)
    assert {"decimal", "fractions"} <= set(modules)
"""

INI = """
[pytest]
trio_fork_preload = decimal workers
"""


def run_suite(pytester: pytest.Pytester, marker: str, ini: str = INI) -> pytest.RunResult:
    pytester.makeini(ini)
    pytester.makepyfile(workers=WORKERS, helpers=HELPERS)
    pytester.makepyfile(test_suite=f"import pytest\npytestmark = {marker}\n" + TESTS)
    return pytester.runpytest("--strict-markers")


def check_pids(pytester: pytest.Pytester, tests: int) -> None:
    lines = [line.split() for line in (pytester.path / "pids.txt").read_text().splitlines()]
    assert len(lines) == tests
    sessions = {int(session) for session, _ in lines}
    assert len(sessions) == 1, "one session template for the whole session"
    assert len({template for _, template in lines}) == tests, "a fresh template per test"
    assert not process_exists(sessions.pop())


def test_under_anyio_on_both_backends(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BOTH_BACKENDS)
    result = run_suite(pytester, "pytest.mark.anyio")
    result.assert_outcomes(passed=4)
    check_pids(pytester, 2)


def test_under_pytest_trio_with_marked_tests(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "pytest.mark.trio")
    result.assert_outcomes(passed=2)
    check_pids(pytester, 1)


def test_under_pytest_trio_in_trio_mode(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "[]", INI + "trio_mode = true\n")
    result.assert_outcomes(passed=2)
    check_pids(pytester, 1)


LEFTOVER = """
import pytest

async def test_leaves_an_orphan(fork_template):
    async with fork_template.spawn("workers:leave_an_orphan") as child:
        pid = int(await child.stream.receive())
    with open("orphans.txt", "a") as file:
        print(pid, file=file)

async def test_cleans_up(fork_template):
    async with fork_template.spawn("workers:report"):
        pass
"""


@pytest.mark.parametrize(
    ("marker", "outcome"),
    [
        # Under anyio's plugin (on both backends by default), a fixture's teardown
        # failure is an error after a pass; under pytest-trio, fixtures run inside
        # the test, which fails.
        ("pytest.mark.anyio", {"passed": 4, "errors": 2}),
        ("pytest.mark.trio", {"passed": 1, "failed": 1}),
    ],
)
def test_a_process_that_outlives_its_block_fails_the_test(
    pytester: pytest.Pytester, marker: str, outcome: dict[str, int]
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(workers=WORKERS)
    pytester.makepyfile(test_leftover=f"import pytest\npytestmark = {marker}\n" + LEFTOVER)
    result = pytester.runpytest()
    result.assert_outcomes(**outcome)
    result.stdout.fnmatch_lines(
        [
            "*fork_template: 1 process(es) started by the test outlived the block that started "
            "them, and were killed at teardown:",
            "*pid *: sleep 60",
        ]
    )
    orphans = [int(pid) for pid in (pytester.path / "orphans.txt").read_text().split()]
    assert orphans
    assert not any(process_exists(pid) for pid in orphans)


def test_a_leftover_without_a_command_line_is_described_as_such() -> None:
    with subprocess.Popen(["true"]) as process:
        # Until it has exited (not reaped: a zombie, which has no command line).
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        described = _isolated._describe(process.pid, os.getpid())
    assert described == f"pid {process.pid} (no command line: exiting, or starting a program)"


CRASH = """
import pytest

async def test_a_child_crashes(fork_template):
    async with fork_template.spawn("workers:crash") as child:
        pass
    assert child.returncode == 0
"""


@pytest.mark.parametrize(("marker", "tests"), [("pytest.mark.anyio", 2), ("pytest.mark.trio", 1)])
def test_a_crashed_childs_stderr_is_in_the_report(
    pytester: pytest.Pytester, marker: str, tests: int
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(workers=WORKERS)
    pytester.makepyfile(test_crash=f"import pytest\npytestmark = {marker}\n" + CRASH)
    result = pytester.runpytest()
    result.assert_outcomes(failed=tests)
    result.stdout.fnmatch_lines(
        [
            "*- Captured stderr call -*",
            "Traceback (most recent call last):",
            '*raise ValueError("a distinctive crash message")',
            "ValueError: a distinctive crash message",
        ]
    )


INERT = """
import os, pytest

def children():
    found = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as file:
            found += file.read().split()
    return found

def test_sync():
    assert not children()

@pytest.mark.anyio
async def test_anyio():
    assert not children()

@pytest.mark.trio
async def test_trio():
    assert not children()
"""


def test_the_plugin_starts_nothing_unless_asked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inert=INERT)
    result = pytester.runpytest("--strict-markers", "--strict-config")
    result.assert_outcomes(passed=4)


def test_a_preload_that_fails_errors_every_test_that_asks(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BOTH_BACKENDS)
    result = run_suite(
        pytester, "pytest.mark.anyio", "[pytest]\ntrio_fork_preload = no_such_module_anywhere\n"
    )
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["*RemoteError: ModuleNotFoundError: *no_such_module_anywhere*"])


def test_a_bad_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marker="""
import pytest

@pytest.mark.trio
@pytest.mark.trio_fork_preload(42)
async def test_it(fork_template):
    pass
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the trio_fork_preload marker: module names are non-empty*"])


def test_the_documented_example(pytester: pytest.Pytester) -> None:
    for path in EXAMPLE.iterdir():
        if path.suffix in (".py", ".ini"):
            shutil.copy(path, pytester.path / path.name)
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=4)
