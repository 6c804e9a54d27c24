"""Cancellations that come once, and Ctrl+C, around run_sync, rpc.call and pool.call.

issue 11 #5: asyncio's own cancellation (``task.cancel()``: ``asyncio.timeout``,
``asyncio.wait_for``, Ctrl+C under ``asyncio.run``) is delivered once. A call that
cannot be cancelled still runs to completion, but then the cancellation is raised,
not swallowed with the result. issue 11 #6: on trio, Ctrl+C reaches the program.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import trio_fork
from tests import rpc_functions as f
from tests.helpers import until
from trio_fork._run_sync import end_default_context

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent

Caller = Callable[..., Awaitable[Any]]


@pytest.fixture(autouse=True)
def end_the_default_context() -> Iterator[None]:
    yield
    end_default_context()


@asynccontextmanager
async def caller(kind: str) -> AsyncIterator[Caller]:
    """A way to call a function in a worker: run_sync, an RPC's call, a pool's call."""
    if kind == "run_sync":
        yield trio_fork.run_sync
        return
    async with trio_fork.open_template() as template:
        if kind == "rpc":
            async with trio_fork.open_rpc(template, f.wait_for_file) as rpc:
                yield lambda function, *args, **kwargs: rpc.call(*args, **kwargs)
        else:
            async with trio_fork.open_pool(template, f.wait_for_file) as pool:
                yield lambda function, *args, **kwargs: pool.call(*args, **kwargs)


KINDS = ["run_sync", "rpc", "pool"]


def started(path: str) -> Callable[[], bool]:
    return lambda: "start a" in f.read_journal(path)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", KINDS)
async def test_asyncio_timeout_is_not_swallowed(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "journal")
    async with caller(kind) as call:
        loop = asyncio.get_running_loop()

        async def expire_then_release(scope: asyncio.Timeout) -> None:
            await until(started(path))
            scope.reschedule(loop.time())
            await asyncio.sleep(0)  # the timeout fires while the call runs
            Path(path + ".go").touch()

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as scope:
                helper = asyncio.create_task(expire_then_release(scope))
                await call(f.wait_for_file, path, "a")
                await asyncio.sleep(30)
        await helper
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        # The call could not be cancelled: it ran to the end, and its worker serves on.
        assert f.read_journal(path) == ["start a", "end a"]
        assert await call(f.wait_for_file, path, "b") == "b"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", KINDS)
async def test_task_cancel_is_not_swallowed(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "journal")
    async with caller(kind) as call:
        task = asyncio.create_task(call(f.wait_for_file, path, "a"))
        await until(started(path))
        task.cancel()
        await asyncio.sleep(0)
        Path(path + ".go").touch()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert f.read_journal(path) == ["start a", "end a"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", KINDS)
async def test_wait_for_kills_with_kill_on_cancel(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "journal")
    async with caller(kind) as call:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call(f.wait_for_file, path, "a", kill_on_cancel=True), 0.2)
        # Killed while it waited (or before it started, on a slow machine).
        assert "end a" not in f.read_journal(path)
        Path(path + ".go").touch()
        if kind == "rpc":  # an RPC is one worker, and it is gone
            with pytest.raises(trio_fork.BrokenWorkerError, match="killed by SIGKILL"):
                await call(f.wait_for_file, path, "b")
        else:  # a new worker takes the next call
            assert await call(f.wait_for_file, path, "b") == "b"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_anyio_cancel_scopes_keep_the_result_on_asyncio(tmp_path: Path) -> None:
    # Level-triggered: the call's result is returned, and the cancellation comes at
    # the next checkpoint (as on trio).
    path = str(tmp_path / "journal")
    scope = anyio.CancelScope()

    async def cancel_then_release() -> None:
        await until(started(path))
        scope.cancel()
        await asyncio.sleep(0)
        Path(path + ".go").touch()

    result = None
    async with anyio.create_task_group() as group:
        group.start_soon(cancel_then_release)
        with scope:
            result = await trio_fork.run_sync(f.wait_for_file, path, "a")
            await anyio.sleep(30)
    assert scope.cancelled_caught
    assert result == "a"


CTRL_C = """
import sys
import anyio, trio_fork
from tests import rpc_functions as f

ready = anyio.Event()


async def calls():
    # A program that logs errors and carries on: Ctrl+C must not become one.
    count = 0
    while True:
        try:
            await trio_fork.run_sync(f.sleep_then_return, 0.001, None)
        except Exception as exc:
            print("logged", repr(exc), flush=True)
        count += 1
        if count == 100:
            ready.set()


async def main():
    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(calls)
        await ready.wait()
        print("ready", flush=True)


def interrupted(exc):
    if isinstance(exc, BaseExceptionGroup):
        return all(interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    try:
        anyio.run(main, backend=sys.argv[1])
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("KeyboardInterrupt", flush=True)
        sys.exit(3)
"""


@pytest.mark.anyio(False)
@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_reaches_the_program(tmp_path: Path, anyio_backend: str, attempt: int) -> None:
    """issue 11 #5 (asyncio.run) and #6 (trio: it was stored and dropped)."""
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent(CTRL_C))
    process = subprocess.Popen(
        [sys.executable, str(program), anyio_backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, stdout) == (3, "KeyboardInterrupt\n"), stderr
