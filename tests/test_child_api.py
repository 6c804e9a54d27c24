"""The child-side API (trio_fork.worker) and the smaller AnyEvent::Fork parity rows.

Events outside calls, a worker's own retirement, the done hook, process titles,
unqualified target names, and a child's socket handed on as a blocking one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import trio_fork
from tests import child_api_functions as f
from tests.helpers import ours

pytestmark = pytest.mark.anyio


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the done hooks write: named in the environment, which templates get."""
    path = str(tmp_path / "journal")
    monkeypatch.setenv("TRIO_FORK_JOURNAL", path)
    return path


@pytest.fixture
async def template(journal: str) -> AsyncIterator[trio_fork.Template]:
    async with trio_fork.open_template(preload=["tests.child_api_functions"]) as template:
        yield template


async def take(events: AsyncIterator[object], count: int) -> list[object]:
    taken = []
    with anyio.fail_after(10):
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                break
    return taken


@pytest.mark.parametrize("function", [f.emit_and_return, f.async_emit_and_return])
async def test_events_outside_calls(template: trio_fork.Template, function: object) -> None:
    async with trio_fork.open_rpc(template, function, init=f.emit_at_start) as rpc:  # type: ignore[arg-type]
        # Kept until taken: the ones init sent came before anyone listened.
        assert await take(rpc.events(), 4) == ["from init", *(("thread", n) for n in range(3))]
        assert await rpc.call(1) == rpc.pid
        assert await rpc.call(2) == rpc.pid
        assert await take(rpc.events(), 2) == [("in a call", 1), ("in a call", 2)]


async def test_the_calls_own_emit_goes_to_the_call(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.emit_per_call_and_outside, events=True) as rpc:
        async with rpc.open_call(1) as call:
            assert [event async for event in call] == [("the call's", 1)]
        assert await take(rpc.events(), 1) == [("outside", 1)]


async def test_events_are_read_while_nothing_else_reads(template: trio_fork.Template) -> None:
    # Nobody calls: the iterating task reads the worker's socket itself.
    async with trio_fork.open_rpc(template, f.emit_and_return, init=f.emit_at_start) as rpc:
        async with anyio.create_task_group() as task_group:
            events: list[object] = []

            async def listen() -> None:
                events.extend(await take(rpc.events(), 6))

            task_group.start_soon(listen)
            for value in ("a", "b"):
                assert await rpc.call(value) == rpc.pid
        assert events[-2:] == [("in a call", "a"), ("in a call", "b")]


@pytest.mark.parametrize("function", [f.retire_when, f.async_retire_when])
async def test_iteration_ends_when_the_worker_is_gone(
    template: trio_fork.Template, function: object
) -> None:
    async with trio_fork.open_rpc(template, function, init=f.emit_at_start) as rpc:  # type: ignore[arg-type]
        await rpc.call("retire")
        with anyio.fail_after(10):
            events = [event async for event in rpc.events()]
    assert events == ["from init", *(("thread", n) for n in range(3))]


async def test_pool_events_come_from_every_worker(template: trio_fork.Template) -> None:
    async with trio_fork.open_pool(
        template, f.emit_and_return, init=f.emit_at_start, idle=3, max=3
    ) as pool:
        events = await take(pool.events(), 12)
        assert events.count("from init") == 3
        async with anyio.create_task_group() as task_group:
            for value in range(6):
                task_group.start_soon(pool.call, value)
        events = await take(pool.events(), 6)
        assert sorted(value for _, value in events) == list(range(6))  # type: ignore[misc]
    with anyio.fail_after(10):
        assert [event async for event in pool.events()] == []


@pytest.mark.parametrize("function", [f.retire_when, f.async_retire_when])
async def test_a_worker_retires_itself_from_a_pool(
    template: trio_fork.Template, function: object, journal: str
) -> None:
    done = f.async_done if function is f.async_retire_when else f.done
    async with trio_fork.open_pool(template, function, max=1, done=done) as pool:  # type: ignore[arg-type]
        first = await pool.call("stay")
        assert await pool.call("retire") == first
        second = await pool.call("stay")
        assert second != first
        # None of the calls made meanwhile is lost.
        async with anyio.create_task_group() as task_group:
            for value in ("retire", "stay", "retire", "stay"):
                task_group.start_soon(pool.call, value)
    # Each worker ran its done hook, the retired ones too.
    assert len(f.read_journal(journal)) >= 3


async def test_an_async_worker_that_retires_finishes_its_calls(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "calls")
    async with trio_fork.open_rpc(template, f.async_retire_when) as rpc:
        async with anyio.create_task_group() as task_group:
            for value in ("retire", *range(20)):
                task_group.start_soon(rpc.call, value, path)
        with pytest.raises(anyio.ClosedResourceError):
            await rpc.call("too late")
    assert sorted(f.read_journal(path)) == sorted(["retire", *map(str, range(20))])


async def test_a_retired_rpc_takes_no_more_calls(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.retire_when) as rpc:
        await rpc.call("retire")
        with pytest.raises(anyio.ClosedResourceError):
            await rpc.call("again")


@pytest.mark.parametrize(
    ("function", "sleeper", "done", "entry"),
    [
        (f.emit_and_return, f.sleep_forever, f.done, "done"),
        (f.async_emit_and_return, f.async_sleep_forever, f.async_done, "async done"),
        (f.async_emit_and_return, f.async_sleep_forever, f.done, "done"),
    ],
)
async def test_done_runs_when_the_parent_closes_the_rpc(
    template: trio_fork.Template,
    journal: str,
    function: object,
    sleeper: object,
    done: object,
    entry: str,
) -> None:
    async with trio_fork.open_rpc(template, function, done=done) as rpc:  # type: ignore[arg-type]
        await rpc.call(1)
        assert f.read_journal(journal) == []
    assert f.read_journal(journal) == [f"{entry} {rpc.pid}"]
    # Not when the worker is killed: the block was left by a cancellation.
    with anyio.move_on_after(0.2):
        async with trio_fork.open_rpc(template, sleeper, done=done) as rpc:  # type: ignore[arg-type]
            await rpc.call(1)
    assert len(f.read_journal(journal)) == 1


async def test_done_is_checked_as_init_is(template: trio_fork.Template) -> None:
    with pytest.raises(trio_fork.RemoteError, match="async done needs an async function"):
        async with trio_fork.open_rpc(template, f.emit_and_return, done=f.async_done):
            pass
    with pytest.raises(trio_fork.RemoteError) as info:
        async with trio_fork.open_rpc(template, f.emit_and_return, done="tests:no_such"):
            pass
    assert info.value.type_name == "AttributeError"
    with pytest.raises(TypeError, match="done"):
        async with trio_fork.open_rpc(template, f.emit_and_return, done=42):  # type: ignore[arg-type]
            pass
    assert set(ours()) == {template.pid}


def test_the_child_side_api_outside_a_worker() -> None:
    assert f.child_api_outside_a_worker() == [
        "emit() can only be called in an RPC worker",
        "retire() can only be called in an RPC worker",
    ]


async def test_process_titles(template: trio_fork.Template) -> None:
    assert f.comm(template.pid) == f"tmpl of {_parent(template.pid)}"
    async with template.fork() as forked:
        await forked.eval("pass")  # it has started serving: its title is set
        assert f.comm(forked.pid) == f"tmpl of {template.pid}"
        async with forked.spawn(f.report_comm) as child:
            assert await child.stream.receive() == b"report_comm"
    async with trio_fork.open_rpc(template, f.emit_and_return) as rpc:
        assert f.comm(rpc.pid) == "rpc emit_and_re"  # 15 bytes at most
    async with trio_fork.open_template(fresh=True) as fresh:
        assert f.comm(fresh.pid) == f"tmpl of {os.getpid()}"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


async def test_unqualified_names_are_looked_up_in_main(template: trio_fork.Template) -> None:
    await template.eval(
        "def hello(sock):\n    sock.sendall(b'hello from __main__')\n"
        "def double(x):\n    return 2 * x\n"
    )
    async with template.spawn("hello") as child:
        assert await child.stream.receive() == b"hello from __main__"
    async with trio_fork.open_rpc(template, "double") as rpc:
        assert await rpc.call(21) == 42
    with pytest.raises(trio_fork.RemoteError) as info:
        async with template.spawn("no_such_function"):
            pass
    assert info.value.type_name == "AttributeError"


async def test_a_childs_socket_handed_on_is_blocking(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    async with (
        template.spawn(f.write_late, str(ready)) as writer,
        template.spawn(f.read_handed_socket) as reader,
    ):
        sock = await writer.detach_stream()
        with sock:
            assert sock.getblocking()
            await reader.stream.send_fds(b"s", [sock.fileno()])
        with pytest.raises(anyio.ClosedResourceError):
            await writer.stream.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await writer.detach_stream()
        # Only now does the writer write: the reader waited, blocking, until then.
        ready.touch()
        with anyio.fail_after(10):
            assert await reader.stream.receive() == b"written late"
    assert (writer.returncode, reader.returncode) == (0, 0)


async def test_a_childs_stream_as_it_is_is_non_blocking(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    # Why detach_stream() exists: a copy of the stream's descriptor is non-blocking.
    ready = tmp_path / "ready"
    async with (
        template.spawn(f.write_late, str(ready)) as writer,
        template.spawn(f.read_handed_socket) as reader,
    ):
        raw = writer.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        await reader.stream.send_fds(b"s", [raw.fileno()])
        with anyio.fail_after(10):
            assert await reader.stream.receive() == b"BlockingIOError"
        ready.touch()
