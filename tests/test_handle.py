"""Template handles: templates that outlive an event loop, opened from any of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import trio

import trio_fork
from tests import targets
from tests.helpers import descendants, process_alive, process_exists, receive

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def handle() -> Iterator[trio_fork.TemplateHandle]:
    with trio_fork.start_template(preload=["tests.targets"]) as handle:
        yield handle


async def report(template: trio_fork.Template) -> dict[str, object]:
    async with template.spawn(targets.report_environment) as child:
        result: dict[str, object] = await receive(child.stream)
    return result


def test_each_run_of_either_backend_opens_a_fresh_fork(handle: trio_fork.TemplateHandle) -> None:
    seen: list[tuple[int, dict[str, object]]] = []

    async def main() -> None:
        async with handle.open() as template:
            env = await report(template)
            seen.append((template.pid, env))
            # What a block does to its fork does not reach the handle's template.
            await template.eval("CHANGED = True")
            assert (await report(template))["main"] == {"CHANGED": True}
        assert set(descendants()) == {handle.pid}

    trio.run(main)
    anyio.run(main, backend="asyncio")
    trio.run(main)
    pids = [pid for pid, _ in seen]
    assert len(set(pids)) == 3
    assert handle.pid not in pids
    for pid, env in seen:
        assert env["ppid"] == pid  # the child's parent is the opened template...
        assert env["main"] == {}
        assert "tests.targets" in env["modules"]  # type: ignore[operator]
        assert "trio" not in env["modules"]  # type: ignore[operator]
    assert not any(process_exists(pid) for pid in pids)


def test_opened_templates_are_children_of_the_handle_process(
    handle: trio_fork.TemplateHandle,
) -> None:
    async def main() -> None:
        async with handle.open() as template:
            with open(f"/proc/{template.pid}/stat") as file:
                ppid = int(file.read().rsplit(")", 1)[1].split()[1])
            assert ppid == handle.pid
        with open(f"/proc/{handle.pid}/stat") as file:
            assert int(file.read().rsplit(")", 1)[1].split()[1]) == os.getpid()

    trio.run(main)


@pytest.mark.anyio
async def test_many_concurrent_opens(handle: trio_fork.TemplateHandle) -> None:
    results: dict[int, object] = {}

    async def one(index: int) -> None:
        async with handle.open() as template, template.spawn(targets.report_raw_args, index) as c:
            results[index] = await receive(c.stream)

    async with anyio.create_task_group() as task_group:
        for index in range(25):
            task_group.start_soon(one, index)
    assert results == {index: (index,) for index in range(25)}
    assert set(descendants()) == {handle.pid}


def test_event_loops_in_several_threads_at_once(handle: trio_fork.TemplateHandle) -> None:
    results: list[object] = []
    failures: list[BaseException] = []

    async def main(index: int) -> None:
        for _ in range(3):
            async with handle.open() as template:
                async with template.spawn(targets.report_raw_args, index) as child:
                    results.append(await receive(child.stream))

    def run(index: int) -> None:
        try:
            if index % 2:
                trio.run(main, index)
            else:
                anyio.run(main, index, backend="asyncio")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert sorted(results) == sorted([(index,) for index in range(4)] * 3)  # type: ignore[type-var]


@pytest.mark.anyio
async def test_leaving_an_opened_template_ends_what_it_started(
    handle: trio_fork.TemplateHandle,
) -> None:
    pids: list[int] = []
    with anyio.move_on_after(0.5):
        async with handle.open() as template:
            pids.append(template.pid)
            async with template.spawn(targets.sleep_forever) as child:
                pids.append(await receive(child.stream))
                await anyio.sleep_forever()
    assert len(pids) == 2
    assert not any(process_exists(pid) for pid in pids)
    assert set(descendants()) == {handle.pid}


@pytest.mark.anyio
async def test_cancelled_opens_leave_nothing(handle: trio_fork.TemplateHandle) -> None:
    for delay in (0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008):
        with anyio.move_on_after(delay):
            async with handle.open() as template, template.spawn(targets.sleep_forever) as child:
                await receive(child.stream)
        assert set(descendants()) == {handle.pid}
    async with handle.open() as template, template.spawn(targets.one_byte) as child:
        assert await child.stream.receive() == b"x"


@pytest.mark.anyio
async def test_closing_the_handle_ends_the_templates_open_from_it() -> None:
    handle = trio_fork.start_template(preload=["tests.targets"])
    async with handle.open() as template:
        with pytest.raises(trio_fork.BrokenTemplateError):
            async with template.spawn(targets.sleep_forever) as child:
                await receive(child.stream)
                handle.close()
                with anyio.fail_after(5):
                    await child.wait()
        with pytest.raises(trio_fork.BrokenTemplateError):
            await template.require("json")
    assert handle.closed
    assert not descendants()


@pytest.mark.anyio
async def test_a_closed_handle_refuses_to_open() -> None:
    with trio_fork.start_template() as handle:
        assert "closed" not in repr(handle)
    assert handle.closed
    assert repr(handle) == f"<trio_fork.TemplateHandle: template {handle.pid} (closed)>"
    handle.close()
    with pytest.raises(anyio.ClosedResourceError, match="is closed"):
        async with handle.open():
            pass


@pytest.mark.anyio
async def test_a_handle_process_killed_from_outside() -> None:
    with trio_fork.start_template() as handle:
        os.kill(handle.pid, signal.SIGKILL)
        with pytest.raises(trio_fork.BrokenTemplateError, match="has died"):
            async with handle.open():
                pass
    assert not descendants()


def test_start_template_options_and_failures(tmp_path: os.PathLike[str]) -> None:
    environ = {**os.environ, "TRIO_FORK_TEST": "handle"}
    with trio_fork.start_template(preload=["json"], env=environ, cwd=tmp_path) as handle:

        async def main() -> dict[str, object]:
            async with handle.open() as template:
                return await report(template)

        env = trio.run(main)
    assert env["env"]["TRIO_FORK_TEST"] == "handle"  # type: ignore[index]
    assert env["cwd"] == os.fspath(tmp_path)
    assert "json" in env["modules"]  # type: ignore[operator]
    with pytest.raises(trio_fork.RemoteError, match="no_such_module_anywhere"):
        trio_fork.start_template(preload=["no_such_module_anywhere"])
    with pytest.raises(FileNotFoundError, match="cannot start a template with python="):
        trio_fork.start_template(python="/no/such/python")
    with pytest.raises(trio_fork.BrokenTemplateError, match="before it was ready"):
        trio_fork.start_template(python="/bin/false")
    with pytest.raises(TypeError, match="1-tuple"):
        trio_fork.start_template(preload="json")


def test_a_forked_copy_of_this_process_lets_go_of_handles() -> None:
    # In a program of its own: pytest-timeout's thread makes this process
    # multi-threaded, and from Python 3.15 os.fork() here raises the DeprecationWarning
    # (an error under our filters) after the copy exists, so its pid would be lost.
    command = [sys.executable, "-W", "error", "-m", "tests.scripts.forked_handle"]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def test_python_version_is_reported_for_handles() -> None:
    # start_template runs the same interpreter as open_template by default.
    with trio_fork.start_template() as handle:

        async def main() -> object:
            async with handle.open() as template:
                await template.eval("import sys; VERSION = tuple(sys.version_info[:2])")
                async with template.spawn(targets.report_environment) as child:
                    return (await receive(child.stream))["main"]

        assert trio.run(main) == {"VERSION": tuple(sys.version_info[:2])}


def test_a_handle_started_in_a_worker_thread_outlives_the_thread() -> None:
    # A template dies with the thread that started it, unless it serves a handle.
    handles: list[trio_fork.TemplateHandle] = []
    thread = threading.Thread(target=lambda: handles.append(trio_fork.start_template()))
    thread.start()
    thread.join()
    with handles[0] as handle:
        time.sleep(0.2)
        assert process_alive(handle.pid)

        async def main() -> None:
            async with handle.open() as template, template.spawn(targets.one_byte) as child:
                assert await child.stream.receive() == b"x"

        trio.run(main)
