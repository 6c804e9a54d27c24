"""run_sync on workers forked from templates of the caller's: remote ones, local ones, both.

``open_worker_context(template=...)`` and ``cache_scope(template=...)``, against a
real sshd (tests/sshd.py), on both backends. The remote side lacks the ``tests``
package: the functions called come to it by import forwarding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import sniffio

import trio_fork
from tests import rpc_functions
from tests.sshd import SshServer, SshTarget
from tests.test_remote import remote

pytestmark = pytest.mark.anyio


async def test_run_sync_on_a_remote_template(ssh_target: SshTarget, sshd_server: SshServer) -> None:
    async with remote(ssh_target) as template:
        async with trio_fork.open_worker_context(template=template) as context:
            assert await context.run_sync(rpc_functions.add, 2, 3) == 5
            pid = await context.run_sync(rpc_functions.getpid)
            assert pid in sshd_server.sessions()
            # Exceptions as themselves, with the remote traceback as their cause.
            with pytest.raises(ValueError, match="boom") as info:
                await context.run_sync(rpc_functions.fail, "boom")
            assert isinstance(info.value.__cause__, trio_fork.RemoteError)
            # Idle workers are reused.
            assert await context.run_sync(rpc_functions.getpid) == pid
            # A worker that dies is a BrokenWorkerError, and is replaced.
            with pytest.raises(trio_fork.BrokenWorkerError):
                await context.run_sync(rpc_functions.exit_now, 3)
            assert await context.run_sync(rpc_functions.getpid) != pid
            assert context.statistics() == trio_fork.WorkerContextStatistics(1, 0)
            # Calls at once spread over workers; large arguments travel in the pickle.
            results: list[int] = []

            async def one(index: int) -> None:
                results.append(await context.run_sync(rpc_functions.length, bytes(index << 16)))

            async with anyio.create_task_group() as task_group:
                for index in range(8):
                    task_group.start_soon(one, index)
            assert sorted(results) == [index << 16 for index in range(8)]
        closed: Any = anyio.ClosedResourceError
        if sniffio.current_async_library() == "trio":
            import trio

            closed = trio.ClosedResourceError
        with pytest.raises(closed):
            await context.run_sync(rpc_functions.add, 1, 1)


async def test_a_context_spans_local_and_remote_templates(
    ssh_target: SshTarget, sshd_server: SshServer, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal")
    async with remote(ssh_target) as far, trio_fork.open_template() as near:
        async with trio_fork.open_worker_context(template=[(near, 1), (far, 2)]) as context:
            pids: list[int] = []
            limiter = anyio.CapacityLimiter(3)  # the default has a token per CPU

            async def one() -> None:
                # Returns once three calls are in: three workers at once, each
                # template with no more than its own most.
                pids.append(await context.run_sync(rpc_functions.meet, journal, 3, limiter=limiter))

            async with anyio.create_task_group() as task_group:
                for _ in range(3):
                    task_group.start_soon(one)
            assert len(set(pids)) == 3
            assert len(set(pids) & set(sshd_server.sessions())) == 2
            assert context.statistics() == trio_fork.WorkerContextStatistics(3, 0)


async def test_cache_scope_sends_run_sync_to_a_remote_template(
    ssh_target: SshTarget, sshd_server: SshServer
) -> None:
    async with remote(ssh_target) as template:
        async with trio_fork.cache_scope(template=template, retire=1):
            # Forked there, from the remote template.
            assert await trio_fork.run_sync(os.getppid) == template.pid
            first = await trio_fork.run_sync(rpc_functions.getpid)
            second = await trio_fork.run_sync(rpc_functions.getpid)
            assert first != second  # retire=1: a new worker for each call


async def test_init_preload_and_kill_on_cancel_on_a_remote_template(
    ssh_target: SshTarget, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal")
    async with remote(ssh_target) as template:
        async with trio_fork.open_worker_context(
            template=template, init=rpc_functions.initialise, preload=["json"]
        ) as context:
            assert await context.run_sync(rpc_functions.initialised) == [()]
            assert await context.run_sync(rpc_functions.modules_loaded, "json") == [True]
            pid = await context.run_sync(rpc_functions.getpid)
            with anyio.move_on_after(0.5):
                await context.run_sync(
                    rpc_functions.wait_for_file, journal, "never", kill_on_cancel=True
                )
            # Its worker was killed; the next call gets a new one.
            assert await context.run_sync(rpc_functions.getpid) != pid


def in_main(name: str) -> Any:
    """A function that pickles as ``__main__.name`` (as a script's functions do)."""

    def function() -> int:
        return 1

    function.__module__ = "__main__"
    function.__qualname__ = function.__name__ = name
    setattr(sys.modules["__main__"], name, function)
    return function


async def test_bad_input_is_refused_with_a_clear_error(ssh_target: SshTarget) -> None:
    with pytest.raises(TypeError, match="template"):
        async with trio_fork.open_worker_context(template="user@host"):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="template"):
        async with trio_fork.open_worker_context(template=[]):
            pass
    function = in_main("trio_fork_test_in_main")
    try:
        async with remote(ssh_target) as template:
            with pytest.raises(TypeError, match="__main__"):
                async with trio_fork.open_worker_context(template=template, init=function):
                    pass
            async with trio_fork.open_worker_context(template=template) as context:
                with pytest.raises(TypeError, match="__main__"):
                    await context.run_sync(function)
                assert await context.run_sync(rpc_functions.add, 1, 2) == 3
    finally:
        delattr(sys.modules["__main__"], "trio_fork_test_in_main")


async def test_a_context_over_templates_refuses_other_event_loops(
    ssh_target: SshTarget, anyio_backend: str
) -> None:
    async with trio_fork.open_template() as template:
        async with trio_fork.open_worker_context(template=template) as context:

            def in_another_event_loop() -> str:
                async def main() -> None:
                    await context.run_sync(rpc_functions.add, 1, 2)

                try:
                    anyio.run(main, backend=anyio_backend)
                except RuntimeError as exc:
                    return str(exc)
                return "no error"

            message = await anyio.to_thread.run_sync(in_another_event_loop)
            assert "belongs to the event loop that opened it" in message
            assert await context.run_sync(rpc_functions.add, 1, 2) == 3
