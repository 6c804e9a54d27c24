"""start_early: open_template() forks a pristine template instead of starting one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import trio_fork
from tests import targets
from tests.helpers import (
    dead_within,
    descendants,
    parent_side_modules,
    process_alive,
    process_exists,
    receive,
)
from trio_fork import _open

pytestmark = pytest.mark.anyio


@pytest.fixture
def early() -> Iterator[int]:
    """The early template's pid."""
    trio_fork.start_early()
    try:
        assert _open._early.handle is not None
        yield _open._early.handle.pid
    finally:
        trio_fork.stop_early()


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


async def environment(template: trio_fork.Template) -> dict[str, object]:
    async with template.spawn(targets.report_environment) as child:
        result: dict[str, object] = await receive(child.stream)
    return result


async def test_a_template_is_the_one_open_template_would_start(
    early: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fresh=True bypasses the early template: this one is started the usual way.
    async with trio_fork.open_template(fresh=True) as fresh:
        assert parent_of(fresh.pid) == os.getpid()
        started = await environment(fresh)
    async with trio_fork.open_template() as template:
        unchanged = await environment(template)
    assert unchanged["env"] == dict(os.environ)
    assert unchanged["cwd"] == os.getcwd()
    assert unchanged["path"] == [os.path.abspath(entry) for entry in sys.path]
    # What changed since start_early() is applied to the template it forks.
    monkeypatch.setenv("TRIO_FORK_EARLY", "now")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        assert parent_of(template.pid) == early
        assert parent_of(early) == os.getpid()
        forked = await environment(template)
    assert forked["env"] == dict(os.environ)
    assert forked["cwd"] == str(tmp_path)
    assert forked["path"] == [os.path.abspath(entry) for entry in sys.path]
    assert forked["main"] == started["main"] == {}
    assert forked["main_has_args"] is False
    assert forked["stdin"] == "/dev/null"
    heavy = {"trio", "anyio", "attrs", "sniffio"}
    assert not heavy & set(forked["modules"])  # type: ignore[call-overload]
    assert parent_side_modules(forked["modules"]) == []
    assert set(forked["modules"]) - set(started["modules"]) <= {"tests", "tests.targets"}  # type: ignore[call-overload]


async def test_env_cwd_and_preload_arguments(early: int, tmp_path: Path) -> None:
    environ = {"PATH": os.environ["PATH"], "TRIO_FORK_EARLY": "given"}
    async with trio_fork.open_template(["json"], env=environ, cwd=tmp_path) as template:
        env = await environment(template)
    assert env["env"] == environ
    assert env["cwd"] == str(tmp_path)
    assert "json" in env["modules"]  # type: ignore[operator]
    with pytest.raises(FileNotFoundError, match="cannot start a template in"):
        async with trio_fork.open_template(cwd=tmp_path / "missing"):
            pass
    with pytest.raises(TypeError, match="env: keys and values must be str"):
        async with trio_fork.open_template(env={"A": 1}):  # type: ignore[dict-item]
            pass
    with pytest.raises(trio_fork.RemoteError, match="no_such_module_anywhere"):
        async with trio_fork.open_template(preload=["no_such_module_anywhere"]):
            pass
    assert set(descendants()) == {early}


async def test_python_given_starts_an_interpreter(early: int) -> None:
    async with trio_fork.open_template(python=sys.executable, fresh=True) as template:
        assert parent_of(template.pid) == os.getpid()
    # Another interpreter than this one's (a symlink to it will do): started too.
    python = Path(sys.executable).resolve()
    assert str(python) != sys.executable
    async with trio_fork.open_template(python=python) as template:
        assert parent_of(template.pid) == os.getpid()


async def test_leaving_the_block_ends_and_reaps_everything(early: int) -> None:
    pids: list[int] = []
    with anyio.move_on_after(0.5):
        async with trio_fork.open_template(preload=["tests.targets"]) as template:
            pids.append(template.pid)
            async with template.fork() as forked, forked.spawn(targets.sleep_forever) as child:
                pids += [forked.pid, await receive(child.stream)]
                await anyio.sleep_forever()
    assert len(pids) == 3
    # Gone, not only dead: the early template reaped them before the block returned.
    assert not any(process_exists(pid) for pid in pids)
    assert set(descendants()) == {early}


async def test_cancelled_opens_leave_nothing(early: int) -> None:
    for delay in (0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008):
        with anyio.move_on_after(delay):
            async with trio_fork.open_template(preload=["tests.targets"]) as template:
                async with template.spawn(targets.sleep_forever) as child:
                    await receive(child.stream)
        assert set(descendants()) == {early}


async def test_concurrent_opens(early: int) -> None:
    results: dict[int, object] = {}

    async def one(index: int) -> None:
        async with (
            trio_fork.open_template(preload=["tests.targets"]) as template,
            template.spawn(targets.report_raw_args, index) as child,
        ):
            results[index] = await receive(child.stream)

    async with anyio.create_task_group() as task_group:
        for index in range(20):
            task_group.start_soon(one, index)
    assert results == {index: (index,) for index in range(20)}


async def test_a_template_killed_from_outside(early: int) -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        os.kill(template.pid, signal.SIGKILL)
        with pytest.raises(trio_fork.BrokenTemplateError), anyio.fail_after(5):
            async with template.spawn(targets.nothing):
                pass
    assert set(descendants()) == {early}


async def test_start_and_stop(early: int) -> None:
    trio_fork.start_early()
    assert _open._early.handle is not None
    assert _open._early.handle.pid == early
    trio_fork.stop_early()
    trio_fork.stop_early()
    assert not process_exists(early)
    # Then open_template() forks the default template again.
    async with trio_fork.open_template() as template:
        assert _open._default.handle is not None
        assert parent_of(template.pid) == _open._default.handle.pid


async def test_an_early_template_killed_from_outside(early: int) -> None:
    os.kill(early, signal.SIGKILL)
    with pytest.raises(trio_fork.BrokenTemplateError, match="early template"):
        async with trio_fork.open_template():
            pass
    # start_early() replaces it (and reaps the dead one).
    trio_fork.start_early()
    assert _open._early.handle is not None
    assert _open._early.handle.pid != early
    assert not process_exists(early)
    async with trio_fork.open_template() as template:
        assert parent_of(template.pid) == _open._early.handle.pid


WORKERS = textwrap.dedent(
    """
    import os, time

    def sleep_forever(sock):
        sock.sendall(str(os.getpid()).encode())
        while True:
            time.sleep(60)
    """
)

PROGRAM = textwrap.dedent(
    """
    import trio_fork

    trio_fork.start_early()

    import trio

    async def main():
        async with trio_fork.open_template(preload=["workers"]) as template:
            async with template.spawn("workers:sleep_forever") as child:
                pid = (await child.stream.receive()).decode()
                early = trio_fork._open._early.handle.pid
                print(early, template.pid, pid, flush=True)
                await trio.sleep_forever()

    trio.run(main)
    """
)


def test_everything_ends_when_the_program_is_killed(tmp_path: Path) -> None:
    (tmp_path / "workers.py").write_text(WORKERS)
    (tmp_path / "program.py").write_text(PROGRAM)
    with subprocess.Popen(
        [sys.executable, str(tmp_path / "program.py")], stdout=subprocess.PIPE, text=True
    ) as program:
        assert program.stdout is not None
        pids = [int(pid) for pid in program.stdout.readline().split()]
        assert len(pids) == 3
        assert all(process_alive(pid) for pid in pids)
        program.send_signal(signal.SIGKILL)
        program.wait()
    assert dead_within(pids, 10)
