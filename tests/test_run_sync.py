"""run_sync and worker contexts: trio_parallel's semantics, on both backends."""

from __future__ import annotations

import functools
import operator
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import trio_fork
from tests import rpc_functions as f
from tests.helpers import cancelled_when, descendants, process_exists, until
from trio_fork._run_sync import end_default_context

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def end_the_default_context() -> Iterator[None]:
    """The default context outlives event loops: each test ends it, for the leak check."""
    yield
    end_default_context()


def cube(value: int) -> int:
    """Defined in this test module: the worker imports the module to find it."""
    return value**3


async def test_results_and_builtins() -> None:
    assert await trio_fork.run_sync(operator.add, 40, 2) == 42
    assert await trio_fork.run_sync(f.echo, 1, "two", [3]) == (1, "two", [3])
    assert await trio_fork.run_sync(len, b"four") == 4
    assert await trio_fork.run_sync(cube, 3) == 27


async def test_errors_are_raised_as_themselves_with_the_remote_traceback() -> None:
    with pytest.raises(ValueError, match="a distinctive message") as info:
        await trio_fork.run_sync(f.fail, "a distinctive message")
    cause = info.value.__cause__
    assert isinstance(cause, trio_fork.RemoteError)
    assert cause.type_name == "ValueError"
    assert "raise ValueError(message)" in cause.remote_traceback
    # An exception that cannot be pickled comes back as its description.
    with pytest.raises(trio_fork.RemoteError) as remote:
        await trio_fork.run_sync(f.fail_unpicklably, "locked")
    assert remote.value.type_name == "tests.rpc_functions.UnpicklableError"
    assert remote.value.message == "locked"


async def test_bad_functions_and_arguments() -> None:
    # A pickling error, whatever pickle raised.
    with pytest.raises(pickle.PicklingError, match="cannot be sent to a worker"):
        await trio_fork.run_sync(lambda: None)
    with pytest.raises(TypeError, match="fn must be callable"):
        await trio_fork.run_sync(42)  # type: ignore[arg-type]
    with pytest.raises(pickle.PicklingError, match=r"argument 1 \(lock\) cannot be pickled"):
        await trio_fork.run_sync(f.echo, 1, threading.Lock())
    # A result that cannot be pickled, in the worker.
    with pytest.raises(pickle.PicklingError, match=r"cannot pickle '_thread\.lock'") as result:
        await trio_fork.run_sync(f.return_unpicklable)
    assert isinstance(result.value.__cause__, trio_fork.RemoteError)
    assert await trio_fork.run_sync(operator.neg, 1) == -1


async def test_async_functions_are_refused_at_the_call() -> None:
    with pytest.raises(TypeError, match="sync functions"):
        await trio_fork.run_sync(f.async_add, 1, 2)
    with pytest.raises(TypeError, match="sync functions"):
        await trio_fork.run_sync(functools.partial(f.async_add, 1), 2)
    # One that only turns out asynchronous when called: its coroutine is closed
    # there, unawaited and without a warning.
    with pytest.raises(TypeError, match="returned a coroutine"):
        await trio_fork.run_sync(f.AsyncCallable(), 1)
    assert await trio_fork.run_sync(operator.neg, 1) == -1


async def test_a_function_the_worker_cannot_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with trio_fork.open_worker_context() as context:
        # A worker starts with this process's sys.path as it is then: the template
        # was started before this directory joined it.
        (tmp_path / "trio_fork_late_module.py").write_text("def late():\n    return 1\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import trio_fork_late_module  # type: ignore[import-not-found]

        assert await context.run_sync(trio_fork_late_module.late) == 1
        (tmp_path / "trio_fork_gone_module.py").write_text("def gone():\n    return 1\n")
        import trio_fork_gone_module  # type: ignore[import-not-found]

        (tmp_path / "trio_fork_gone_module.py").unlink()
        with pytest.raises(RuntimeError, match="could not load the function to call") as info:
            await context.run_sync(trio_fork_gone_module.gone)
        assert "trio_fork_gone_module" in str(info.value)
        assert isinstance(info.value.__cause__, trio_fork.RemoteError)
        assert await context.run_sync(operator.pos, 1) == 1


async def test_entry_is_a_checkpoint(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await trio_fork.run_sync(f.record, path, "never")
    assert scope.cancelled_caught
    assert f.read_journal(path) == []
    # Before anything started: no template, no worker.
    assert descendants() == {}
    assert trio_fork.default_context_statistics() == trio_fork.WorkerContextStatistics(0, 0)


async def test_without_kill_on_cancel_the_call_completes(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    await trio_fork.run_sync(operator.pos, 0)  # the default context is up
    result = None
    async with cancelled_when(lambda: f.read_journal(path) == ["start a"]) as scope:
        result = await trio_fork.run_sync(f.record, path, "a", 0.3)
        await anyio.lowlevel.checkpoint()  # the cancellation takes effect here
    assert scope.cancelled_caught
    assert result == "a"
    assert f.read_journal(path) == ["start a", "end a"]


@pytest.mark.parametrize("argument", ["kill_on_cancel", "cancellable"])
async def test_kill_on_cancel_kills_the_worker(tmp_path: Path, argument: str) -> None:
    path = str(tmp_path / "journal")
    async with cancelled_when(lambda: bool(f.read_journal(path))) as scope:
        await trio_fork.run_sync(f.meet, path, 2, **{argument: True})
    assert scope.cancelled_caught
    (pid,) = f.read_journal(path)
    await until(lambda: not process_exists(int(pid)))
    assert await trio_fork.run_sync(f.getpid) != int(pid)


async def test_a_worker_that_dies_is_replaced() -> None:
    with pytest.raises(trio_fork.BrokenWorkerError, match="exited with status 9"):
        await trio_fork.run_sync(f.exit_now, 9)
    assert await trio_fork.run_sync(operator.pos, 1) == 1


async def test_workers_may_emit_events_and_retire() -> None:
    # run_sync has no one to take events: they are dropped. retire() replaces the worker.
    first = await trio_fork.run_sync(f.getpid)
    assert await trio_fork.run_sync(f.emit_then_retire, 5) == 5
    assert await trio_fork.run_sync(f.getpid) != first


async def test_the_default_limiter_and_a_limiter_of_our_own(
    tmp_path: Path, anyio_backend: str
) -> None:
    limiter = trio_fork.current_default_worker_limiter()
    assert limiter.total_tokens == (os.cpu_count() or 1)
    if anyio_backend == "trio":
        import trio

        assert isinstance(limiter, trio.CapacityLimiter)  # as trio_parallel's is
    else:
        assert isinstance(limiter, anyio.CapacityLimiter)
    assert trio_fork.current_default_worker_limiter() is trio_fork.current_default_worker_limiter()
    path = str(tmp_path / "journal")
    limiter = anyio.CapacityLimiter(1)
    async with anyio.create_task_group() as group:
        for index in range(3):
            group.start_soon(
                functools.partial(trio_fork.run_sync, limiter=limiter),
                f.record,
                path,
                str(index),
                0.02,
            )
    entries = f.read_journal(path)
    # One at a time: every start is followed by its own end.
    assert [entry.split()[0] for entry in entries] == ["start", "end"] * 3
    assert [entry.split()[1] for entry in entries[::2]] == [
        entry.split()[1] for entry in entries[1::2]
    ]


async def test_workers_are_reused_and_counted(tmp_path: Path) -> None:
    assert trio_fork.default_context_statistics() == trio_fork.WorkerContextStatistics(0, 0)
    first = await trio_fork.run_sync(f.getpid)
    assert await trio_fork.run_sync(f.getpid) == first
    assert trio_fork.default_context_statistics() == trio_fork.WorkerContextStatistics(1, 0)
    path = str(tmp_path / "journal")
    async with anyio.create_task_group() as group:
        group.start_soon(trio_fork.run_sync, f.meet, path, 2)
        await until(lambda: len(f.read_journal(path)) == 1)
        assert trio_fork.default_context_statistics().running_workers == 1
        f.journal(path, "release")


async def test_worker_contexts_are_isolated_and_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "journal")
    flag = tmp_path / "retire now"
    monkeypatch.setenv("TRIO_FORK_TEST_RETIRE", str(flag))
    default_pid = await trio_fork.run_sync(f.getpid)
    async with trio_fork.open_worker_context(
        preload=["decimal"],
        init=functools.partial(f.init_journal, path),
        retire=f.retire_when_asked,
    ) as context:
        pid = await context.run_sync(f.getpid)
        assert pid != default_pid
        assert await context.run_sync(f.modules_loaded, "decimal") == [True]
        assert f.read_journal(path) == [f"init {pid}"]
        flag.touch()
        # This call makes the worker retire when it is done.
        assert await context.run_sync(f.getpid) == pid
        flag.unlink()
        replacement = await context.run_sync(f.getpid)
        assert replacement != pid
        assert f.read_journal(path) == [f"init {pid}", f"init {replacement}"]
        assert context.statistics() == trio_fork.WorkerContextStatistics(1, 0)
    assert not process_exists(replacement)


async def test_retire_after_a_number_of_calls_and_idle_timeout() -> None:
    async with trio_fork.open_worker_context(retire=2, idle_timeout=0.05) as context:
        pids = [await context.run_sync(f.getpid) for _ in range(4)]
        assert pids[0] == pids[1] != pids[2] == pids[3]
        await until(lambda: context.statistics() == trio_fork.WorkerContextStatistics(0, 0))


BAD_SETTINGS = [
    ({"preload": "json"}, TypeError, "1-tuple"),
    ({"preload": [1]}, TypeError, "module names"),
    ({"idle_timeout": -1}, ValueError, "non-negative"),
    ({"idle_timeout": [-1]}, TypeError, "number of seconds"),
    ({"idle_timeout": "1"}, TypeError, "number of seconds"),
    ({"grace_period": -1}, ValueError, "non-negative"),
    ({"grace_period": None}, TypeError, "number of seconds"),
    ({"worker_type": "wrong"}, ValueError, "'spawn', 'forkserver', 'fork'"),
    ({"retire": 0}, ValueError, "at least 1 call"),
    ({"retire": True}, TypeError, "must be callable"),
    ({"retire": None}, TypeError, "must be callable"),
    ({"init": None}, TypeError, "must be callable"),
    ({"init": 0}, TypeError, "must be callable"),
    ({"init": lambda: None}, TypeError, "cannot be found by name"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_SETTINGS)
async def test_bad_context_settings(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    # trio_parallel's errors for its arguments (test_impl.py's test_erroneous_scope_*).
    with pytest.raises(error, match=message):
        async with trio_fork.open_worker_context(**kwargs):  # type: ignore[arg-type]
            pass
    with pytest.raises(error, match=message):
        async with trio_fork.cache_scope(**kwargs):  # type: ignore[arg-type]
            pass
    with pytest.raises(error, match=message):
        trio_fork.configure_default_context(**kwargs)  # type: ignore[arg-type]
    assert descendants() == {}


async def test_a_preload_that_fails() -> None:
    with pytest.raises(trio_fork.RemoteError, match="no_such_module_anywhere"):
        async with trio_fork.open_worker_context(preload=["no_such_module_anywhere"]):
            pass


@pytest.fixture
def default_settings() -> Iterator[None]:
    yield
    trio_fork.configure_default_context()


@pytest.mark.usefixtures("default_settings")
async def test_configure_the_default_context() -> None:
    trio_fork.configure_default_context(preload=["decimal"])
    pid = await trio_fork.run_sync(f.getpid)
    assert await trio_fork.run_sync(f.modules_loaded, "decimal") == [True]
    # A default context with workers is replaced, with a warning, as trio_parallel
    # does; its idle worker ends.
    with pytest.warns(UserWarning, match="1 worker"):
        trio_fork.configure_default_context(retire=1)
    assert not process_exists(pid)
    first = await trio_fork.run_sync(f.getpid)
    assert await trio_fork.run_sync(f.getpid) != first
    assert await trio_fork.run_sync(f.modules_loaded, "decimal") == [False]


async def test_configure_the_default_context_from_the_main_thread_only() -> None:
    with pytest.raises(RuntimeError, match="main thread"):
        await anyio.to_thread.run_sync(trio_fork.configure_default_context)


_SCRIPT = """
import dataclasses, sys

import anyio
import trio_fork


@dataclasses.dataclass
class Point:
    x: int
    y: int


def double(point):
    return Point(point.x * 2, point.y * 2)


async def main():
    print(await trio_fork.run_sync(double, Point(1, 2)))
    print(await trio_fork.run_sync(abs, -3))

{run}
"""


def run_script(tmp_path: Path, run: str, backend: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(run=run))
    return subprocess.run(
        [sys.executable, str(script), backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


def test_functions_and_classes_defined_in_main(tmp_path: Path, anyio_backend: str) -> None:
    result = run_script(
        tmp_path,
        textwrap.dedent(
            """
            if __name__ == "__main__":
                anyio.run(main, backend=sys.argv[1])
            """
        ),
        anyio_backend,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Point(x=2, y=4)", "3"]
    # The default context, its workers and its template end quietly with the run.
    assert result.stderr == ""


def test_a_main_module_that_runs_the_program_when_loaded(tmp_path: Path) -> None:
    result = run_script(tmp_path, "anyio.run(main, backend=sys.argv[1])", "trio")
    assert result.returncode == 1
    assert 'if __name__ == "__main__":' in result.stderr
    assert "RemoteError" in result.stderr


_IMPORTED = """
import anyio
import trio_fork


def negate(value):
    return -value


class Value(int):
    pass


async def main():
    print(await trio_fork.run_sync({call}))

anyio.run(main, backend={backend!r})
"""


@pytest.mark.parametrize("call", ["negate, 3", "abs, Value(-3)"], ids=["function", "argument"])
def test_a_module_that_starts_workers_when_imported(
    tmp_path: Path, anyio_backend: str, call: str
) -> None:
    """Imported by name, not run as __main__: each worker loading a call's function or
    argument would import it, and start workers again, without end."""
    (tmp_path / "program.py").write_text(_IMPORTED.format(call=call, backend=anyio_backend))
    result = subprocess.run(
        [sys.executable, "-c", "import program"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "a worker was loading the function or the arguments of a call" in result.stderr
    assert "under 'if __name__ == \"__main__\":'" in result.stderr


def test_an_ended_asyncio_run_is_not_kept_alive() -> None:
    """What run_sync keeps per event loop run goes with the loop (it kept each loop)."""
    import asyncio
    import gc
    import weakref

    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        assert await trio_fork.run_sync(operator.add, 1, 2) == 3
        assert trio_fork.current_default_worker_limiter().total_tokens >= 1

    for _ in range(2):
        asyncio.run(main())
    gc.collect()
    assert [loop() for loop in loops] == [None, None]
