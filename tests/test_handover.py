"""export / adopt_template: a template's channel handed to another owner (to_fh, new_from_fh)."""

from __future__ import annotations

import os
import pickle
import socket

import anyio
import pytest

import trio_fork
from tests import targets
from tests.helpers import descendants, ours, process_alive, receive

pytestmark = pytest.mark.anyio


async def test_adopted_in_this_process_it_is_the_same_template() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        await template.eval("X = 42")
        await template.send_args("queued before the hand-over")
        channel = await template.export()
        with pytest.raises(anyio.ClosedResourceError, match="handed over"):
            await template.require("json")
        with channel:
            async with trio_fork.adopt_template(channel) as adopted:
                assert adopted.pid == template.pid
                async with adopted.spawn(targets.report_args, "after") as child:
                    assert await receive(child.stream) == ["queued before the hand-over", "after"]
                await adopted.eval("assert X == 42")
            # The adopter's block ended it; the exporter's block reaps it.
            assert not process_alive(template.pid)


async def test_handed_to_a_child_process(anyio_backend: str) -> None:
    async with (
        trio_fork.open_template(preload=["tests.targets", "trio_fork"]) as workers,
        trio_fork.open_template(preload=["tests.targets"]) as shared,
    ):
        channel = await shared.export()
        async with workers.spawn(targets.adopt_and_report) as child:
            with channel:
                await child.stream.send_fds(b"t", [channel.fileno()])
            pid, reported = pickle.loads(await child.stream.receive())
            assert pid == shared.pid
            assert reported == ("from the adopter",)
            assert process_alive(shared.pid)
            await child.stream.send(b"done")
        assert child.returncode == 0
        # The adopter left its block, which waited until the template had exited.
        assert not process_alive(shared.pid)


async def test_the_exporters_block_still_bounds_the_lifetime() -> None:
    adopted_templates: list[trio_fork.Template] = []
    failures: list[BaseException] = []
    exporter_left = anyio.Event()

    async def adopter(channel: socket.socket, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with trio_fork.adopt_template(channel) as adopted:
            channel.close()
            adopted_templates.append(adopted)
            task_status.started()
            await exporter_left.wait()
            try:
                await adopted.require("json")
            except trio_fork.BrokenTemplateError as exc:
                failures.append(exc)

    async with anyio.create_task_group() as task_group:
        async with trio_fork.open_template() as template:
            await task_group.start(adopter, await template.export())
        exporter_left.set()
    assert len(failures) == 1
    assert not ours()


async def test_export_is_refused_while_a_block_is_open() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        async with template.spawn(targets.wait_for_eof):
            with pytest.raises(RuntimeError, match="spawn\\(\\) or fork\\(\\) block"):
                await template.export()
        async with template.fork():
            with pytest.raises(RuntimeError, match="1 spawn\\(\\) or fork\\(\\) block"):
                await template.export()
        # Still ours, still working.
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


async def test_export_waits_for_commands_in_flight() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(template.eval, "import time; time.sleep(0.2); X = 1")
            await anyio.sleep(0.05)
            channel = await template.export()
        with channel:
            async with trio_fork.adopt_template(channel) as adopted:
                await adopted.eval("assert X == 1")


async def test_a_cancelled_export_leaves_the_template_usable() -> None:
    async with trio_fork.open_template() as template:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(template.eval, "import time; time.sleep(0.3)")
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.05) as scope:
                await template.export()
            assert scope.cancelled_caught
        await template.require("json")


async def test_an_adopted_template_can_be_exported_again() -> None:
    async with trio_fork.open_template() as template:
        with await template.export() as first:
            async with trio_fork.adopt_template(first) as adopted:
                await adopted.eval("Y = 'kept'")
                with await adopted.export() as second:
                    async with trio_fork.adopt_template(second) as again:
                        assert again.pid == template.pid
                        await again.eval("assert Y == 'kept'")


async def test_a_template_opened_from_a_handle() -> None:
    with trio_fork.start_template() as handle:
        async with handle.open() as template:
            with await template.export() as channel:
                async with trio_fork.adopt_template(channel) as adopted:
                    assert adopted.pid == template.pid
        assert set(descendants()) == {handle.pid}


async def test_bad_channels() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TypeError, match="not a Unix stream socket"):
            async with trio_fork.adopt_template(read_end):
                pass
    finally:
        os.close(read_end)
        os.close(write_end)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(TypeError, match="not a Unix stream socket"):
            async with trio_fork.adopt_template(udp):
                pass
    ours, theirs = socket.socketpair()
    theirs.close()
    with ours, pytest.raises(trio_fork.BrokenTemplateError, match=r"has ended|died"):
        async with trio_fork.adopt_template(ours):
            pass
    with pytest.raises(ValueError, match="not an open file descriptor"):
        async with trio_fork.adopt_template(-1):
            pass
