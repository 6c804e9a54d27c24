"""RPC to one worker: results, errors, events, serializers, init, cancellation, death."""

from __future__ import annotations

import marshal
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import trio_fork
from tests import rpc_functions as f
from tests.helpers import cancelled_when, descendants, ours, process_exists, until

pytestmark = pytest.mark.anyio


@pytest.fixture
async def template() -> AsyncIterator[trio_fork.Template]:
    async with trio_fork.open_template(preload=["tests.rpc_functions"]) as template:
        yield template


async def test_calls_return_results(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.add) as rpc:
        assert not rpc.concurrent
        assert await rpc.call(1, 2) == 3
        assert await rpc.call("a", "b") == "ab"
        assert await rpc.call([1], [2]) == [1, 2]
        assert rpc.pid in descendants()
    async with trio_fork.open_rpc(template, "tests.rpc_functions:echo") as rpc:
        assert await rpc.call() == ()
        assert await rpc.call(None, {"k": (1, 2)}) == (None, {"k": (1, 2)})


async def test_errors_come_back_with_the_remote_traceback(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.fail) as rpc:
        with pytest.raises(trio_fork.RemoteError) as info:
            await rpc.call("a distinctive message")
        error = info.value
        assert error.type_name == "ValueError"
        assert error.message == "a distinctive message"
        assert "raise ValueError(message)" in error.remote_traceback
        assert "rpc_functions.py" in error.remote_traceback
        # The worker's own frames are not shown: the traceback starts at the function.
        assert "trio_fork/worker/" not in error.remote_traceback
        assert "Remote traceback" in str(error)
        # A failed call leaves the worker serving.
        with pytest.raises(trio_fork.RemoteError, match="again"):
            await rpc.call("again")


async def test_wrong_arguments_are_a_remote_type_error(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.add) as rpc:
        with pytest.raises(trio_fork.RemoteError) as info:
            await rpc.call(1, 2, 3)
        assert info.value.type_name == "TypeError"
        assert await rpc.call(2, 2) == 4


async def test_big_arguments_and_results(template: trio_fork.Template) -> None:
    size = 16 * 1024 * 1024
    data = os.urandom(size)
    async with trio_fork.open_rpc(template, f.length) as rpc:
        assert await rpc.call(data) == size
    async with trio_fork.open_rpc(template, f.make_bytes) as rpc:
        result = await rpc.call(size)
        assert len(result) == size
        assert result == bytes(range(256)) * (size // 256)
    async with trio_fork.open_rpc(template, f.identity) as rpc:
        assert await rpc.call(data) == data


async def test_results_that_cannot_be_serialized(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.return_unpicklable) as rpc:
        with pytest.raises(trio_fork.RemoteError, match="could not serialize the result"):
            await rpc.call()
        with pytest.raises(TypeError, match="cannot be serialized"):
            await rpc.call(threading.Lock())
        with pytest.raises(trio_fork.RemoteError, match="could not serialize the result"):
            await rpc.call()


async def test_json_serializer(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.echo, serializer=trio_fork.JSON) as rpc:
        # JSON has no tuples: what went as a tuple comes back as a list.
        assert await rpc.call(1, "é", [None, True], {"k": 2.5}) == [
            1,
            "é",
            [None, True],
            {"k": 2.5},
        ]
        with pytest.raises(TypeError, match="cannot be serialized"):
            await rpc.call({1, 2})


class Doubling:
    """A serializer of our own: JSON, with every int doubled on the way in."""

    def dumps(self, obj: Any) -> bytes:
        return trio_fork.JSON.dumps(obj)

    def loads(self, data: bytes) -> Any:
        loaded = trio_fork.JSON.loads(data)
        return [item * 2 if isinstance(item, int) else item for item in loaded]


async def test_custom_and_module_serializers(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.echo, serializer=Doubling()) as rpc:
        # Doubled when the worker loads the arguments, and again when we load the result.
        assert await rpc.call(1, 2) == [4, 8]
    async with trio_fork.open_rpc(template, f.echo, serializer=marshal) as rpc:
        assert await rpc.call(1, b"two", (3,)) == (1, b"two", (3,))


async def test_bad_serializers(template: trio_fork.Template) -> None:
    with pytest.raises(TypeError, match=r"no dumps\(\) and loads\(\)"):
        async with trio_fork.open_rpc(template, f.echo, serializer=object()):
            pass
    with pytest.raises(TypeError, match=r"module 'os' has no dumps\(\)"):
        async with trio_fork.open_rpc(template, f.echo, serializer=os):
            pass

    class Local(Doubling):
        pass

    with pytest.raises(TypeError, match="cannot be sent to a worker"):
        async with trio_fork.open_rpc(template, f.echo, serializer=Local()):
            pass


async def test_init_runs_once_before_any_call(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(
        template, f.initialised, init=f.initialise, init_args=("a", 1)
    ) as rpc:
        assert await rpc.call() == [("a", 1)]
        assert await rpc.call() == [("a", 1)]
    async with trio_fork.open_rpc(template, f.initialised, init="tests.rpc_functions:initialise"):
        pass


async def test_init_failure_fails_the_open(template: trio_fork.Template) -> None:
    with pytest.raises(trio_fork.RemoteError) as info:
        async with trio_fork.open_rpc(template, f.add, init=f.broken_init):
            pytest.fail("the RPC should not open")
    assert info.value.type_name == "RuntimeError"
    assert "init failed on purpose" in info.value.remote_traceback
    assert set(ours()) == {template.pid}


async def test_functions_that_cannot_be_found(template: trio_fork.Template) -> None:
    for name, type_name in [
        ("tests.rpc_functions:no_such_function", "AttributeError"),
        ("no_such_module_anywhere:f", "ModuleNotFoundError"),
    ]:
        with pytest.raises(trio_fork.RemoteError) as info:
            async with trio_fork.open_rpc(template, name):
                pass
        assert info.value.type_name == type_name
    with pytest.raises(ValueError, match="module:qualname"):
        async with trio_fork.open_rpc(template, "mod:"):
            pass
    with pytest.raises(TypeError, match="cannot be found by name"):
        async with trio_fork.open_rpc(template, lambda: None):
            pass
    with pytest.raises(TypeError, match="not int"):
        async with trio_fork.open_rpc(template, 42):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="init_args"):
        async with trio_fork.open_rpc(template, f.add, init=f.initialise, init_args="ab"):
            pass
    assert set(ours()) == {template.pid}


async def test_events_while_a_call_runs(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.progress, events=True) as rpc:
        async with rpc.open_call(3) as call:
            events = [event async for event in call]
            assert call.done
            assert await call.result() == "done"
        assert events == [{"step": 0}, {"step": 1}, {"step": 2}]
        # Events of a plain call are dropped.
        assert await rpc.call(5) == "done"
        # Events that arrive before anyone iterates are kept.
        async with rpc.open_call(2) as call:
            assert await call.result() == "done"
            assert [event async for event in call] == [{"step": 0}, {"step": 1}]


async def test_emit_after_the_call_raises(template: trio_fork.Template) -> None:
    await template.eval(
        "def keep(emit):\n    global kept\n    kept = emit\n\ndef use_kept():\n    kept('late')\n"
    )
    async with trio_fork.open_rpc(template, "__main__:keep", events=True) as rpc:
        await rpc.call()
    async with trio_fork.open_rpc(template, "__main__:use_kept") as rpc:
        pass
    await template.eval(
        "def keep_and_use(emit, first):\n    global kept\n"
        "    if first:\n        kept = emit\n    else:\n        kept('late')\n"
    )
    async with trio_fork.open_rpc(template, "__main__:keep_and_use", events=True) as rpc:
        await rpc.call(True)
        with pytest.raises(trio_fork.RemoteError, match="after its call had finished"):
            await rpc.call(False)


async def test_leaving_open_call_raises_an_error_not_taken(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.fail) as rpc:
        with pytest.raises(trio_fork.RemoteError, match="not taken"):
            async with rpc.open_call("not taken"):
                pass


async def test_a_sync_worker_runs_calls_one_at_a_time_in_order(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.record) as rpc, anyio.create_task_group() as group:
        for index in range(5):
            group.start_soon(rpc.call, path, str(index), 0.01)
            await anyio.sleep(0.001)
    entries = f.read_journal(path)
    assert entries == [f"{edge} {index}" for index in range(5) for edge in ("start", "end")]


async def test_an_async_worker_runs_calls_concurrently(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.gather_at_barrier) as rpc:
        assert rpc.concurrent
        results: list[str] = []

        async def one() -> None:
            results.append(await rpc.call(10))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for _ in range(10):
                    group.start_soon(one)
        assert results == ["all here"] * 10


async def test_async_results_errors_and_events(
    template: trio_fork.Template, anyio_backend: str, tmp_path: Path
) -> None:
    async with trio_fork.open_rpc(template, f.current_backend) as rpc:
        assert await rpc.call() == anyio_backend
    async with trio_fork.open_rpc(template, f.async_add) as rpc:
        assert await rpc.call(40, 2) == 42
    async with trio_fork.open_rpc(template, f.async_fail) as rpc:
        with pytest.raises(trio_fork.RemoteError) as info:
            await rpc.call("missing")
        assert info.value.type_name == "KeyError"
        assert "async_fail" in info.value.remote_traceback
    async with trio_fork.open_rpc(template, f.async_progress, events=True) as rpc:
        async with rpc.open_call(4) as call:
            assert [event async for event in call] == [0, 1, 2, 3]
            assert await call.result() == "async done"
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(
        template, f.async_add, init=f.async_init, init_args=(path,)
    ) as rpc:
        assert await rpc.call(1, 1) == 2
    assert f.read_journal(path) == ["async init"]


async def test_an_async_init_needs_an_async_function(template: trio_fork.Template) -> None:
    with pytest.raises(trio_fork.RemoteError, match="an async init needs an async function"):
        async with trio_fork.open_rpc(template, f.add, init=f.async_init, init_args=("x",)):
            pass


# Cancellation.


async def test_cancelling_a_running_sync_call_lets_it_finish(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.record) as rpc:
        result = None
        async with cancelled_when(lambda: f.read_journal(path) == ["start a"]) as scope:
            result = await rpc.call(path, "a", 0.3)
            await anyio.lowlevel.checkpoint()  # the cancellation takes effect here
        assert scope.cancelled_caught
        assert result == "a"
        assert f.read_journal(path) == ["start a", "end a"]
        assert await rpc.call(path, "b") == "b"


async def test_a_cancelled_queued_sync_call_never_runs(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.wait_for_file) as rpc:
        outcomes: list[str] = []

        async def queued(scope: anyio.CancelScope) -> None:
            with scope:
                await rpc.call(path, "second")
                outcomes.append("returned")
            if scope.cancelled_caught:
                outcomes.append("cancelled")

        async with anyio.create_task_group() as group:
            group.start_soon(rpc.call, path, "first")
            await until(lambda: f.read_journal(path) == ["start first"])
            scope = anyio.CancelScope()
            group.start_soon(queued, scope)
            await anyio.sleep(0.05)
            # Queued behind "first" in the worker: dropped when the worker gets to it.
            scope.cancel()
            await anyio.sleep(0.05)
            Path(path + ".go").touch()
        assert outcomes == ["cancelled"]
        assert f.read_journal(path) == ["start first", "end first"]
        assert await rpc.call(path, "third") == "third"


async def test_kill_on_cancel_kills_a_sync_worker(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.wait_for_file) as rpc:
        pid = rpc.pid
        with anyio.move_on_after(0.1) as scope:
            await rpc.call(path, "stuck", kill_on_cancel=True)
        assert scope.cancelled_caught
        assert not process_exists(pid)
        with pytest.raises(trio_fork.BrokenWorkerError, match="killed by SIGKILL"):
            await rpc.call(path, "after")


async def test_cancelling_an_async_call_cancels_it_in_the_worker(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.async_record) as rpc:
        async with cancelled_when(lambda: bool(f.read_journal(path))) as scope:
            await rpc.call(path, "a")
        assert scope.cancelled_caught
        # The worker has answered by the time the cancellation is raised.
        assert f.read_journal(path) == ["start a", "cancelled a"]
    async with trio_fork.open_rpc(template, f.async_shielded) as rpc:
        result = None
        async with cancelled_when(lambda: bool(f.read_journal(path + "2"))) as scope:
            result = await rpc.call(path + "2", 0.2)
        assert not scope.cancelled_caught
        assert result == "completed"
        assert await rpc.call(path + "3", 0) == "completed"


async def test_async_calls_cancelled_at_once(template: trio_fork.Template) -> None:
    async with trio_fork.open_rpc(template, f.async_add) as rpc:
        outcomes = set()
        for _ in range(20):
            result = None
            with anyio.CancelScope() as scope:
                scope.cancel()
                # Dropped if the worker sees the cancellation first; kept if the
                # call had already finished. Either way the worker answered it.
                result = await rpc.call(1, 2)
            outcomes.add("cancelled" if scope.cancelled_caught else result)
            assert rpc._connection.load == 0
        assert outcomes <= {"cancelled", 3}
        assert await rpc.call(1, 2) == 3


async def test_leaving_open_call_early_cancels_the_call(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.async_record) as rpc:
        with pytest.raises(RuntimeError, match="leaving"):
            async with rpc.open_call(path, "a"):
                await until(lambda: f.read_journal(path))
                raise RuntimeError("leaving")
        assert f.read_journal(path) == ["start a", "cancelled a"]


# Workers that die.


@pytest.mark.parametrize(
    ("function", "args", "status"),
    [(f.exit_now, (3,), "exited with status 3"), (f.kill_self, (), "killed by SIGKILL")],
)
async def test_a_worker_that_dies_in_a_call(
    template: trio_fork.Template, function: Any, args: tuple[Any, ...], status: str
) -> None:
    async with trio_fork.open_rpc(template, function) as rpc:
        with pytest.raises(trio_fork.BrokenWorkerError, match=f"{status} while running this call"):
            await rpc.call(*args)
        with pytest.raises(trio_fork.BrokenWorkerError, match=status):
            await rpc.call(*args)


async def test_a_worker_killed_from_outside(template: trio_fork.Template, tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_rpc(template, f.wait_for_file) as rpc:
        async with anyio.create_task_group() as group:
            failures: list[BaseException] = []

            async def call(entry: str) -> None:
                try:
                    await rpc.call(path, entry)
                except trio_fork.BrokenWorkerError as exc:
                    failures.append(exc)

            group.start_soon(call, "running")
            await until(lambda: f.read_journal(path))
            group.start_soon(call, "queued")
            await anyio.sleep(0.05)
            os.kill(rpc.pid, signal.SIGTERM)
        messages = sorted(str(failure) for failure in failures)
        assert len(messages) == 2
        assert "killed by SIGTERM before this call started" in messages[0]
        assert "killed by SIGTERM while running this call" in messages[1]


# The block's lifetime.


async def test_leaving_the_block_waits_for_calls_in_flight(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    results: list[str] = []
    async with anyio.create_task_group() as group:
        async with trio_fork.open_rpc(template, f.record) as rpc:

            async def call() -> None:
                results.append(await rpc.call(path, "late", 0.2))

            group.start_soon(call)
            await until(lambda: f.read_journal(path))
    assert results == ["late"]
    with pytest.raises(anyio.ClosedResourceError):
        await rpc.call(path, "closed")


async def test_leaving_the_block_by_an_error_kills_the_worker(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    failures: list[BaseException] = []
    async with anyio.create_task_group() as group:
        with pytest.raises(KeyError):
            async with trio_fork.open_rpc(template, f.wait_for_file) as rpc:

                async def call() -> None:
                    try:
                        await rpc.call(path, "stuck")
                    except trio_fork.BrokenWorkerError as exc:
                        failures.append(exc)

                group.start_soon(call)
                await until(lambda: f.read_journal(path))
                raise KeyError("leaving")
    assert not process_exists(rpc.pid)
    assert len(failures) == 1
    assert "was stopped" in str(failures[0])
