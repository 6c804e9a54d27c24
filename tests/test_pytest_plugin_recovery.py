"""The pytest plugin's session template is replaced if it dies (issue 11 #7)."""

from __future__ import annotations

import pytest

from tests.helpers import process_exists

pytest_plugins = ["pytester"]

TESTS = """
import os, signal, time
import pytest

pytestmark = pytest.mark.anyio

@pytest.fixture
def anyio_backend():
    return "{backend}"

def record(*values):
    with open("sessions.txt", "a") as file:
        print(*values, file=file)

def state(pid):
    with open(f"/proc/{{pid}}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()[0]

async def test_the_oom_killer_takes_the_session_template(trio_fork_session_template):
    record(trio_fork_session_template.pid)
    os.kill(trio_fork_session_template.pid, signal.SIGKILL)
    while state(trio_fork_session_template.pid) != "Z":
        time.sleep(0.01)

async def test_the_next_test_gets_a_new_one(fork_template, trio_fork_session_template):
    record(trio_fork_session_template.pid)
    async with fork_template.spawn("os:getpid"):
        pass
"""


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_session_template_that_died_is_replaced(pytester: pytest.Pytester, backend: str) -> None:
    pytester.makepyfile(test_oom=TESTS.format(backend=backend))
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    killed, replacement = (int(pid) for pid in (pytester.path / "sessions.txt").read_text().split())
    assert killed != replacement
    assert not process_exists(killed)
    assert not process_exists(replacement)
