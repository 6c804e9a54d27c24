"""The process-wide default template: what open_template() forks, started on first use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest
import trio

import trio_fork
from tests import targets
from tests.helpers import dead_within, ours, process_exists, receive
from trio_fork import _open

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


def default_pid() -> int:
    handle = _open._default.handle
    assert handle is not None
    return handle.pid


async def environment(template: trio_fork.Template) -> dict[str, object]:
    async with template.spawn(targets.report_environment) as child:
        result: dict[str, object] = await receive(child.stream)
    return result


async def test_templates_are_forks_of_one_default_template() -> None:
    assert _open._default.handle is None
    pids = []
    for _ in range(3):
        async with trio_fork.open_template() as template:
            pids.append(template.pid)
            assert parent_of(template.pid) == default_pid()
            assert set(ours()) == {template.pid}
    assert parent_of(default_pid()) == os.getpid()
    assert len(set(pids)) == 3
    assert not any(process_exists(pid) for pid in pids)
    # Still there, for the next open_template() of the program.
    assert set(ours()) == set()
    assert process_exists(default_pid())


async def test_a_fork_is_what_a_fresh_interpreter_would_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with trio_fork.open_template(fresh=True) as fresh:
        started = await environment(fresh)
    async with trio_fork.open_template():
        pass
    # What changes after the default template started is applied to each fork.
    monkeypatch.setenv("TRIO_FORK_DEFAULT_TEST", "now")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        forked = await environment(template)
    assert forked["env"] == dict(os.environ)
    assert forked["cwd"] == str(tmp_path)
    assert forked["path"] == [os.path.abspath(entry) for entry in sys.path]
    assert forked["main"] == started["main"] == {}
    assert forked["stdin"] == started["stdin"] == "/dev/null"
    assert set(forked["modules"]) - set(started["modules"]) <= {"tests", "tests.targets"}  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "how", ["fresh=True", "TRIO_FORK_DEFAULT_TEMPLATE=0", "python=", "env=", "cwd="]
)
async def test_a_fresh_interpreter_when_asked_for_one(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: dict[str, object] = {}
    if how == "fresh=True":
        options["fresh"] = True
    elif how == "python=":
        options["python"] = Path(sys.executable).resolve()  # another path: another python
    elif how == "env=":
        options["env"] = dict(os.environ, TRIO_FORK_DEFAULT_TEST="other")
    elif how == "cwd=":
        options["cwd"] = tmp_path
    else:
        monkeypatch.setenv("TRIO_FORK_DEFAULT_TEMPLATE", "0")
    async with trio_fork.open_template(**options) as template:  # type: ignore[arg-type]
        assert parent_of(template.pid) == os.getpid()
        env = await environment(template)
    assert _open._default.handle is None
    if how == "env=":
        assert env["env"] == options["env"]
    if how == "cwd=":
        assert env["cwd"] == str(tmp_path)


async def test_arguments_equal_to_the_defaults_fork_it() -> None:
    options: list[dict[str, object]] = [
        {"python": sys.executable},
        {"env": dict(os.environ)},
        {"cwd": os.getcwd()},
        {"cwd": "."},
    ]
    for option in options:
        async with trio_fork.open_template(**option) as template:  # type: ignore[arg-type]
            assert parent_of(template.pid) == default_pid()


async def test_a_default_template_that_died_is_replaced() -> None:
    async with trio_fork.open_template():
        pass
    first = default_pid()
    os.kill(first, signal.SIGKILL)
    assert dead_within([first], 5)
    async with trio_fork.open_template() as template:
        assert parent_of(template.pid) == default_pid() != first
    assert not process_exists(first)  # reaped, not left a zombie


async def test_started_by_many_tasks_at_once() -> None:
    pids: list[int] = []

    async def one() -> None:
        async with trio_fork.open_template() as template:
            pids.append(parent_of(template.pid))

    async with anyio.create_task_group() as task_group:
        for _ in range(6):
            task_group.start_soon(one)
    # Each fork came from a default template, and one is left: the others are gone.
    assert len(pids) == 6
    assert set(ours()) == set()
    assert all(pid == default_pid() or not process_exists(pid) for pid in pids)


def test_kept_across_event_loops_and_threads() -> None:
    parents: list[int] = []

    async def main() -> None:
        async with trio_fork.open_template() as template:
            parents.append(parent_of(template.pid))
            async with template.spawn(targets.one_byte) as child:
                assert await child.stream.receive() == b"x"

    trio.run(main)
    anyio.run(main, backend="asyncio")
    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    thread.join()
    trio.run(main)
    assert len(parents) == 4
    assert set(parents) == {default_pid()}


async def test_early_stays_the_source() -> None:
    trio_fork.start_early()
    try:
        async with trio_fork.open_template() as template:
            early = _open.early_handle()
            assert early is not None
            assert parent_of(template.pid) == early.pid
            assert _open.default_handle() is early
        assert _open._default.handle is None
    finally:
        trio_fork.stop_early()


def test_default_handle_from_synchronous_code() -> None:
    handle = _open.default_handle()
    assert handle is _open.default_handle()
    assert repr(handle) == f"<trio_fork.TemplateHandle: default template {handle.pid}>"

    async def main() -> int:
        async with trio_fork.open_template() as template:
            return parent_of(template.pid)

    assert trio.run(main) == handle.pid
    handle.close()  # closed by someone: replaced, as a dead one would be
    assert _open.default_handle() is not handle


PROGRAM = textwrap.dedent(
    """
    import json, os, sys

    import anyio
    import trio_fork
    from trio_fork import _open


    def parent_of(pid):
        with open(f"/proc/{pid}/stat") as file:
            return int(file.read().rsplit(")", 1)[1].split()[1])


    async def main():
        async with trio_fork.open_template() as template:
            return parent_of(template.pid)


    first = anyio.run(main)
    default = _open._default.handle.pid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        # A copy made with os.fork() starts a default template of its own.
        os.close(read_end)
        parent = anyio.run(main)
        mine = _open._default.handle.pid
        os.write(write_end, json.dumps([parent, mine, os.getpid()]).encode())
        os._exit(0)
    os.close(write_end)
    child = json.loads(os.read(read_end, 4096))
    os.waitpid(pid, 0)
    print(json.dumps({"first": first, "default": default, "child": child}))
    """
)


def test_a_forked_program_starts_its_own_and_exit_ends_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["first"] == report["default"]
    parent, mine, _ = report["child"]
    assert parent == mine != report["default"]
    # The program's ended at interpreter exit, the copy's when the copy died.
    assert dead_within([report["default"], mine], 5)
