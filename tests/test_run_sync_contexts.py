"""run_sync as a drop-in for trio_parallel and anyio.to_process: contexts, the default
context that outlives event loops, cache_scope, and what the peers' users catch."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import trio_fork
from tests import rpc_functions as f
from tests.helpers import dead_within, process_alive, until
from trio_fork._run_sync import end_default_context

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def end_the_default_context() -> Iterator[None]:
    """The default context outlives event loops: each test ends it, for the leak check."""
    yield
    end_default_context()


async def getpids() -> tuple[int, int]:
    """A worker's pid and its template's."""
    return await trio_fork.run_sync(os.getpid), await trio_fork.run_sync(os.getppid)


@pytest.mark.anyio(False)
def test_the_default_context_outlives_event_loops(anyio_backend: str) -> None:
    assert trio_fork.default_context_statistics() == trio_fork.WorkerContextStatistics(0, 0)
    first = anyio.run(getpids, backend=anyio_backend)
    # Outside any event loop, as trio_parallel's.
    assert trio_fork.default_context_statistics() == trio_fork.WorkerContextStatistics(1, 0)
    assert anyio.run(getpids, backend=anyio_backend) == first
    other = "asyncio" if anyio_backend == "trio" else "trio"
    assert anyio.run(getpids, backend=other) == first


@pytest.mark.anyio(False)
def test_event_loops_in_threads_share_the_default_context(anyio_backend: str) -> None:
    results: dict[int, list[int]] = {}

    async def calls(index: int) -> None:
        results[index] = [await trio_fork.run_sync(os.getppid) for _ in range(20)]

    threads = [
        threading.Thread(target=anyio.run, args=(calls, index), kwargs={"backend": anyio_backend})
        for index in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    templates = {pid for pids in results.values() for pid in pids}
    assert len(results) == 3
    assert len(templates) == 1


async def test_a_closed_context_raises_what_the_backend_catches(anyio_backend: str) -> None:
    async with trio_fork.open_worker_context() as context:
        assert await context.run_sync(abs, -1) == 1
    with pytest.raises(anyio.ClosedResourceError):
        await context.run_sync(abs, -1)
    if anyio_backend == "trio":
        import trio

        with pytest.raises(trio.ClosedResourceError):
            await context.run_sync(abs, -1)
    assert context.statistics() == trio_fork.WorkerContextStatistics(0, 0)


async def test_leaving_a_context_waits_for_its_calls(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    async with anyio.create_task_group() as group:
        async with trio_fork.open_worker_context() as context:
            for name in "ab":
                group.start_soon(context.run_sync, f.wait_for_file, path, name)
            await until(lambda: len(f.read_journal(path)) == 2)
            Path(path + ".go").touch()
        # Both calls finished before the block was left.
        assert sorted(f.read_journal(path)) == ["end a", "end b", "start a", "start b"]


async def test_errors_are_those_the_peers_users_catch() -> None:
    with pytest.raises(RuntimeError, match="exited with status 3") as info:
        await trio_fork.run_sync(f.exit_now, 3)
    assert isinstance(info.value, trio_fork.BrokenWorkerError)
    assert isinstance(info.value, anyio.BrokenWorkerProcess)
    with pytest.raises(TypeError, match="no public constructor"):
        trio_fork.WorkerContext()


async def test_settings_are_kept_and_worker_types_accepted() -> None:
    assert [member.value for member in trio_fork.WorkerType] == ["spawn", "forkserver", "fork"]
    for kind in [*trio_fork.WorkerType, "fork"]:
        async with trio_fork.open_worker_context(
            30, float, 5, 1.5, kind, preload=["decimal"]
        ) as context:
            assert (context.idle_timeout, context.init, context.retire) == (30, float, 5)
            assert (context.grace_period, context.worker_type) == (1.5, trio_fork.WorkerType(kind))
            assert await context.run_sync(f.modules_loaded, "decimal") == [True]


async def test_manager_proxies_work_in_workers() -> None:
    # A worker has this process's multiprocessing authkey, as spawned processes do.
    with multiprocessing.get_context("spawn").Manager() as manager:
        event = manager.Event()
        assert await trio_fork.run_sync(f.set_event, event)
        assert event.is_set()
    # What spawn started besides the manager, for the leak check.
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


async def test_cache_scope_replaces_the_default_in_its_block() -> None:
    default = await trio_fork.run_sync(os.getpid)
    async with trio_fork.open_worker_context() as explicit:
        mine = await explicit.run_sync(os.getpid)
        async with trio_fork.cache_scope():
            scoped = await trio_fork.run_sync(os.getpid)
            assert scoped not in (default, mine)
            assert trio_fork.default_context_statistics() == trio_fork.WorkerContextStatistics(1, 0)
            assert await explicit.run_sync(os.getpid) == mine
            async with trio_fork.cache_scope(retire=1):
                nested = await trio_fork.run_sync(os.getpid)
                assert nested not in (default, scoped)
                assert await trio_fork.run_sync(os.getpid) != nested
            assert await trio_fork.run_sync(os.getpid) == scoped
            assert process_alive(scoped)
    assert not process_alive(scoped)
    assert await trio_fork.run_sync(os.getpid) == default


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_cache_scope_follows_the_task_tree_on_trio() -> None:
    import trio

    # Which context a call went to, by its template (calls at once take more workers).
    default = await trio_fork.run_sync(os.getppid)
    seen: dict[str, int] = {}

    async def record(
        name: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        seen[name] = await trio_fork.run_sync(os.getppid)
        task_status.started()
        seen[name + " after started"] = await trio_fork.run_sync(os.getppid)

    async with trio.open_nursery() as outside:
        async with trio_fork.cache_scope():
            scoped = await trio_fork.run_sync(os.getppid)
            # Into a nursery opened before the block: the default, on both sides of
            # started(), as with trio_parallel (tricycle.TreeVar).
            outside.start_soon(record, "started inside, outside nursery")
            await outside.start(record, "start()ed inside, outside nursery")
            async with trio.open_nursery() as inside:
                inside.start_soon(record, "started inside, inside nursery")
                await trio.testing.wait_all_tasks_blocked()
    assert seen == {
        "started inside, outside nursery": default,
        "started inside, outside nursery after started": default,
        "start()ed inside, outside nursery": default,
        "start()ed inside, outside nursery after started": default,
        "started inside, inside nursery": scoped,
        "started inside, inside nursery after started": scoped,
    }

    # A nursery opened inside the block, and a task started into it from outside.
    shared: trio.Nursery | None = None
    release = trio.Event()

    async def block_around_a_nursery(task_status: trio.TaskStatus[int]) -> None:
        nonlocal shared
        async with trio_fork.cache_scope(), trio.open_nursery() as shared:
            task_status.started(await trio_fork.run_sync(os.getppid))
            await release.wait()
        seen["after the block"] = await trio_fork.run_sync(os.getppid)

    async def from_outside() -> None:
        seen["from outside"] = await trio_fork.run_sync(os.getppid)
        release.set()

    async with trio.open_nursery() as nursery:
        scoped = await nursery.start(block_around_a_nursery)
        assert shared is not None
        shared.start_soon(from_outside)
    assert seen["from outside"] == scoped
    assert seen["after the block"] == default


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cache_scope_follows_the_context_on_asyncio() -> None:
    # asyncio has no task tree: a task copies the context of the task that starts it.
    default = await trio_fork.run_sync(os.getppid)
    seen: dict[str, int] = {}

    async def record(name: str) -> None:
        seen[name] = await trio_fork.run_sync(os.getppid)

    async with anyio.create_task_group() as outside:
        async with trio_fork.cache_scope():
            scoped = await trio_fork.run_sync(os.getppid)
            outside.start_soon(record, "started inside")
            await until(lambda: "started inside" in seen)
        outside.start_soon(record, "started outside")
    assert seen == {"started inside": scoped, "started outside": default}


@pytest.mark.parametrize("worker_busy", [False, True])
async def test_the_default_context_recovers_when_its_template_dies(worker_busy: bool) -> None:
    """issue 11 #7: the OOM killer takes the template; the next call starts another."""
    worker, template = await getpids()
    async with anyio.create_task_group() as group:
        if worker_busy:

            async def running_call() -> None:
                with pytest.raises(trio_fork.BrokenWorkerError, match=f"worker {worker}"):
                    await trio_fork.run_sync(f.sleep_then_return, 60, None)

            group.start_soon(running_call)
            await until(lambda: trio_fork.default_context_statistics().running_workers == 1)
        os.kill(template, signal.SIGKILL)
    assert dead_within([template, worker], 10)
    new_worker, new_template = await getpids()
    assert new_template != template
    assert new_worker != worker
    assert await trio_fork.run_sync(abs, -4) == 4


async def test_a_context_of_ones_own_recovers_too() -> None:
    async with trio_fork.open_worker_context() as context:
        worker, template = await context.run_sync(os.getpid), await context.run_sync(os.getppid)
        os.kill(template, signal.SIGKILL)
        # Its idle worker dies with it (a call sent before it does would fail).
        assert dead_within([template, worker], 10)
        assert await context.run_sync(os.getppid) != template


def run_program(tmp_path: Path, source: str, *args: str, name: str = "program.py") -> str:
    """Run a program (a hang fails the test); its standard output.

    Its output is block-buffered, as a pipe's is, whatever PYTHONUNBUFFERED says here.
    """
    program = tmp_path / name
    program.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONUNBUFFERED", None)
    result = subprocess.run(
        [sys.executable, str(program), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.anyio(False)
def test_ended_at_exit_and_workers_flush_what_they_printed(
    tmp_path: Path, anyio_backend: str
) -> None:
    output = run_program(
        tmp_path,
        """
        import os, sys
        import anyio, trio_fork

        async def main():
            await trio_fork.run_sync(print, "printed by the worker")
            print(await trio_fork.run_sync(os.getpid), await trio_fork.run_sync(os.getppid))
            sys.stdout.flush()

        if __name__ == "__main__":
            anyio.run(main, backend=sys.argv[1])
        """,
        anyio_backend,
    )
    # The worker's line sat in its buffer until it was ended at exit, after the
    # program's own last line.
    pids, printed = output.splitlines()
    assert printed == "printed by the worker"
    assert dead_within([int(pid) for pid in pids.split()], 10)


@pytest.mark.anyio(False)
def test_a_forked_process_has_a_default_context_of_its_own(
    tmp_path: Path, anyio_backend: str
) -> None:
    output = run_program(
        tmp_path,
        """
        import os, sys
        import anyio, trio_fork

        async def template():
            return await trio_fork.run_sync(os.getppid)

        if __name__ == "__main__":
            backend = sys.argv[1]
            before = anyio.run(template, backend=backend)
            pid = os.fork()
            if pid == 0:
                print("child", anyio.run(template, backend=backend), flush=True)
                sys.exit(0)
            _, status = os.waitpid(pid, 0)
            print("status", status)
            print("parent", before, anyio.run(template, backend=backend))
        """,
        anyio_backend,
    )
    lines = dict(line.split(" ", 1) for line in output.splitlines())
    assert lines["status"] == "0"
    before, after = lines["parent"].split()
    assert before == after != lines["child"]


@pytest.mark.anyio(False)
def test_an_entry_point_main_module_runs_in_workers_only_when_used(
    tmp_path: Path, anyio_backend: str
) -> None:
    """anyio's test_entrypoint_main_module, and a main module with side effects."""
    output = run_program(
        tmp_path,
        """
        import os, sys
        import anyio, trio_fork
        from tests import rpc_functions as f

        with open("imported", "a") as log:
            print(__name__, os.getpid(), file=log)
        foo = 3

        async def main():
            await trio_fork.run_sync(abs, -1)
            with open("imported") as log:
                print("after a call that needs nothing of it:", len(log.readlines()))
            print("foo:", await trio_fork.run_sync(f.main_attribute, "foo"))
            with open("imported") as log:
                print("then:", log.readlines()[-1].split()[0])

        if __name__ == "__main__":
            anyio.run(main, backend=sys.argv[1])
        """,
        anyio_backend,
        name="my-entrypoint",
    )
    assert output.splitlines() == [
        "after a call that needs nothing of it: 1",
        "foo: 3",
        "then: __mp_main__",
    ]
