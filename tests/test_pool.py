"""Pools of RPC workers: balance, growth and shrinking, retiring, broken workers."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import trio_fork
from tests import rpc_functions as f
from tests.helpers import descendants, process_exists, until

pytestmark = pytest.mark.anyio


@pytest.fixture
async def template() -> AsyncIterator[trio_fork.Template]:
    async with trio_fork.open_template(preload=["tests.rpc_functions"]) as template:
        yield template


def workers(template: trio_fork.Template) -> set[int]:
    return set(descendants(template.pid))


async def test_calls_are_spread_over_the_workers(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(template, f.meet, max=4, start=0) as pool:
        # Four calls that can only return together: each needs a worker of its own.
        pids: list[int] = []

        async def one() -> None:
            pids.append(await pool.call(path, 4))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(one)
        assert len(set(pids)) == 4
        assert set(pids) == workers(template)
        stats = pool.statistics()
        assert (stats.workers, stats.idle_workers) == (4, 4)


async def test_pool_results_errors_and_events(template: trio_fork.Template) -> None:
    async with trio_fork.open_pool(template, f.add, max=2) as pool:
        assert await pool.call(1, 2) == 3
        with pytest.raises(trio_fork.RemoteError) as info:
            await pool.call(1, "2")
        assert info.value.type_name == "TypeError"
        assert "return a + b" in info.value.remote_traceback
    async with trio_fork.open_pool(template, f.progress, events=True) as pool:
        async with pool.open_call(2) as call:
            assert [event async for event in call] == [{"step": 0}, {"step": 1}]
            assert await call.result() == "done"
    async with trio_fork.open_pool(template, f.async_progress, events=True, load=4) as pool:
        async with pool.open_call(3) as call:
            assert [event async for event in call] == [0, 1, 2]
        assert await pool.call(1) == "async done"


async def test_idle_workers_are_ready_when_the_block_starts(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(
        template, f.getpid, idle=3, max=3, init=f.init_journal, init_args=(path,)
    ) as pool:
        stats = pool.statistics()
        assert (stats.workers, stats.idle_workers, stats.starting_workers) == (3, 3, 0)
        pids = workers(template)
        assert len(pids) == 3
        # init ran once in each of them, before the block started.
        assert sorted(f.read_journal(path)) == sorted(f"init {pid}" for pid in pids)
        assert await pool.call() in pids


async def test_the_pool_grows_to_max_and_shrinks_to_idle(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(
        template, f.wait_for_file, max=3, idle=1, start=0, stop=0.05
    ) as pool:
        async with anyio.create_task_group() as group:
            for index in range(5):
                group.start_soon(pool.call, path, str(index))
            await until(lambda: len(f.read_journal(path)) == 3)
            stats = pool.statistics()
            assert (stats.workers, stats.busy_workers, stats.queued_calls) == (3, 3, 2)
            Path(path + ".go").touch()
        assert sorted(f.read_journal(path)) == sorted(
            f"{edge} {index}" for index in range(5) for edge in ("start", "end")
        )
        # Idle for longer than stop: all but one worker go.
        await until(lambda: pool.statistics().workers == 1)
        assert pool.statistics().idle_workers == 1
        assert len(workers(template)) == 1


async def test_start_paces_new_workers(template: trio_fork.Template, tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(template, f.wait_for_file, max=4, start=math.inf) as pool:
        async with anyio.create_task_group() as group:
            for index in range(3):
                group.start_soon(pool.call, path, str(index))
            await until(lambda: len(f.read_journal(path)) == 1)
            # The first worker started at once; the next may never start.
            await anyio.sleep(0.1)
            stats = pool.statistics()
            assert (stats.workers, stats.queued_calls) == (1, 2)
            Path(path + ".go").touch()
        assert len(f.read_journal(path)) == 6


async def test_workers_retire_after_so_many_calls(template: trio_fork.Template) -> None:
    async with trio_fork.open_pool(template, f.getpid, max=1, retire=2, start=0) as pool:
        pids = [await pool.call() for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    assert len(set(pids)) == 3


async def test_a_broken_worker_is_replaced(template: trio_fork.Template) -> None:
    async with trio_fork.open_pool(template, f.exit_now, max=1, start=0) as pool:
        with pytest.raises(trio_fork.BrokenWorkerError, match="exited with status 5 while running"):
            await pool.call(5)
        with pytest.raises(trio_fork.BrokenWorkerError, match="exited with status 6"):
            await pool.call(6)
    async with trio_fork.open_pool(template, f.getpid, max=1, idle=1) as pool:
        first = await pool.call()
        os.kill(first, signal.SIGKILL)
        # Once its exit is reported, it is replaced (idle=1 keeps one ready).
        await until(lambda: first not in workers(template) and len(workers(template)) == 1)
        await until(lambda: pool.statistics().idle_workers == 1)
        assert await pool.call() != first


async def test_calls_queued_on_a_dying_worker_go_to_another(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(template, f.wait_for_file, max=1, load=2, start=0) as pool:
        results: list[object] = []

        async def call(entry: str) -> None:
            try:
                results.append(await pool.call(path, entry))
            except trio_fork.BrokenWorkerError as exc:
                results.append(type(exc))

        async with anyio.create_task_group() as group:
            group.start_soon(call, "first")
            await until(lambda: f.read_journal(path) == ["start first"])
            group.start_soon(call, "second")
            await until(lambda: pool.statistics().running_calls == 2)
            (pid,) = workers(template)
            Path(path + ".go").unlink(missing_ok=True)
            os.kill(pid, signal.SIGKILL)
            await until(lambda: "start second" in f.read_journal(path))
            Path(path + ".go").touch()
        # "second" was queued behind "first" in the dead worker: it never started
        # there, so it ran on the replacement.
        assert results == [trio_fork.BrokenWorkerError, "second"]
        assert f.read_journal(path) == ["start first", "start second", "end second"]


async def test_kill_on_cancel_replaces_the_worker(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(template, f.wait_for_file, max=1, start=0) as pool:
        with anyio.move_on_after(0.2) as scope:
            await pool.call(path, "stuck", kill_on_cancel=True)
        assert scope.cancelled_caught
        Path(path + ".go").touch()
        assert await pool.call(path, "next") == "next"


async def test_a_cancelled_call_waiting_for_a_worker_is_taken_back(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    async with trio_fork.open_pool(template, f.wait_for_file, max=1, start=0) as pool:
        async with anyio.create_task_group() as group:
            group.start_soon(pool.call, path, "first")
            await until(lambda: f.read_journal(path) == ["start first"])
            with anyio.move_on_after(0.05) as scope:
                await pool.call(path, "never")
            assert scope.cancelled_caught
            assert pool.statistics().queued_calls == 0
            Path(path + ".go").touch()
        assert f.read_journal(path) == ["start first", "end first"]


async def test_init_errors(template: trio_fork.Template) -> None:
    with pytest.raises(trio_fork.RemoteError, match="init failed on purpose"):
        async with trio_fork.open_pool(template, f.add, idle=2, init=f.broken_init):
            pytest.fail("the pool should not open")
    async with trio_fork.open_pool(template, f.add, init=f.broken_init, start=0) as pool:
        for _ in range(3):
            with pytest.raises(trio_fork.RemoteError, match="init failed on purpose"):
                await pool.call(1, 2)
        assert pool.statistics().workers == 0
    assert workers(template) == set()


async def test_leaving_the_block_waits_then_ends_the_workers(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    results: list[str] = []
    async with anyio.create_task_group() as group:
        async with trio_fork.open_pool(template, f.record, max=2, start=0) as pool:

            async def call(entry: str) -> None:
                results.append(await pool.call(path, entry, 0.1))

            group.start_soon(call, "a")
            group.start_soon(call, "b")
            await until(lambda: len(f.read_journal(path)) == 2)
    assert sorted(results) == ["a", "b"]
    assert workers(template) == set()
    with pytest.raises(anyio.ClosedResourceError):
        await pool.call(path, "closed", 0)


async def test_leaving_the_block_by_an_error_kills_the_workers(
    template: trio_fork.Template, tmp_path: Path
) -> None:
    path = str(tmp_path / "journal")
    failures: list[BaseException] = []
    async with anyio.create_task_group() as group:
        with pytest.raises(KeyError):
            async with trio_fork.open_pool(template, f.wait_for_file, max=1, start=0) as pool:

                async def call(entry: str) -> None:
                    try:
                        await pool.call(path, entry)
                    except (trio_fork.BrokenWorkerError, anyio.ClosedResourceError) as exc:
                        failures.append(exc)

                group.start_soon(call, "running")
                await until(lambda: bool(f.read_journal(path)))
                group.start_soon(call, "queued")
                await until(lambda: pool.statistics().queued_calls == 1)
                raise KeyError("leaving")
    assert workers(template) == set()
    assert sorted(type(failure).__name__ for failure in failures) == [
        "BrokenWorkerError",
        "ClosedResourceError",
    ]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"max": 0}, ValueError, "max must be at least 1"),
        ({"max": 1.5}, TypeError, "max must be an int"),
        ({"idle": -1}, ValueError, "idle must be at least 0"),
        ({"idle": 3, "max": 2}, ValueError, "idle .3. cannot exceed max .2."),
        ({"load": 0}, ValueError, "load must be at least 1"),
        ({"start": -1}, ValueError, "start must be a non-negative"),
        ({"stop": "10"}, TypeError, "stop must be a number"),
        ({"retire": 0}, ValueError, "retire must be at least 1"),
        ({"retire": True}, TypeError, "retire must be an int"),
    ],
)
async def test_bad_limits(
    template: trio_fork.Template, arguments: dict[str, object], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        async with trio_fork.open_pool(template, f.add, **arguments):  # type: ignore[arg-type]
            pass
    assert workers(template) == set()


async def test_pool_on_a_dead_template(template: trio_fork.Template) -> None:
    async with trio_fork.open_pool(template, f.add, start=0) as pool:
        assert await pool.call(1, 1) == 2
        os.kill(template.pid, signal.SIGKILL)
        await until(lambda: not process_exists(template.pid) or pool.statistics().workers == 0)
        with pytest.raises((trio_fork.BrokenTemplateError, trio_fork.BrokenWorkerError)):
            await pool.call(1, 1)
