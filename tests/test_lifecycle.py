"""Structured lifetimes: what leaving a block ends, on every path."""

from __future__ import annotations

import os
import signal
import time

import anyio
import pytest

import trio_fork
from tests import targets
from tests.helpers import ours, process_alive, process_exists, receive

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


async def test_leaving_spawn_normally_closes_the_stream_and_waits() -> None:
    async with trio_fork.open_template() as template:
        async with template.spawn(targets.wait_for_eof) as child:
            pass
        assert child.returncode == 0


async def test_cancellation_kills_the_child_and_waits_until_reaped() -> None:
    async with trio_fork.open_template() as template:
        with anyio.move_on_after(0.2) as scope:
            async with template.spawn(targets.sleep_forever) as child:
                await receive(child.stream)
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert child.returncode == -signal.SIGKILL
        assert not process_exists(child.pid)


async def test_an_exception_kills_the_child_and_propagates_as_itself() -> None:
    async with trio_fork.open_template() as template:
        with pytest.raises(Boom):
            async with template.spawn(targets.sleep_forever) as child:
                await receive(child.stream)
                raise Boom
        assert child.returncode == -signal.SIGKILL


async def test_exceptions_leave_open_template_and_fork_unwrapped() -> None:
    with pytest.raises(Boom):
        async with trio_fork.open_template():
            raise Boom
    with pytest.raises(Boom):
        async with trio_fork.open_template() as template, template.fork():
            raise Boom


async def test_deliver_cancel_chooses_how_the_child_ends() -> None:
    delivered = []

    async def terminate(child: trio_fork.Child) -> None:
        delivered.append(child.pid)
        child.terminate()

    async with trio_fork.open_template() as template:
        with anyio.move_on_after(0.2):
            async with template.spawn(targets.sleep_forever, deliver_cancel=terminate) as child:
                await receive(child.stream)
                await anyio.sleep_forever()
    assert delivered == [child.pid]
    assert child.returncode == -signal.SIGTERM


async def test_deliver_cancel_may_talk_to_the_child() -> None:
    async def ask_to_quit(child: trio_fork.Child) -> None:
        await child.stream.send(b"quit")

    async with trio_fork.open_template() as template:
        with anyio.move_on_after(0.2):
            async with template.spawn(targets.exit_on_message, deliver_cancel=ask_to_quit) as child:
                assert await receive(child.stream) == "ready"
                await anyio.sleep_forever()
    assert child.returncode == 0


async def test_a_failing_deliver_cancel_still_kills() -> None:
    async def broken(child: trio_fork.Child) -> None:
        raise Boom

    async with trio_fork.open_template() as template:
        with pytest.raises(Boom):
            async with template.spawn(targets.sleep_forever, deliver_cancel=broken) as child:
                await receive(child.stream)
                raise ValueError("the body failed first")
    assert child.returncode == -signal.SIGKILL


async def test_cancelling_the_wait_at_the_end_of_the_block_kills() -> None:
    async with trio_fork.open_template() as template:
        with anyio.move_on_after(0.2):
            async with template.spawn(targets.sleep_forever) as child:
                await receive(child.stream)
        assert child.returncode == -signal.SIGKILL


async def test_leaving_a_template_ends_everything_it_started() -> None:
    pids: list[int] = []

    async def run_forever(template: trio_fork.Template) -> None:
        async with template.spawn(targets.sleep_forever) as child:
            pids.append(await receive(child.stream))
            await anyio.sleep_forever()

    with anyio.move_on_after(0.5):
        async with trio_fork.open_template() as template:
            pids.append(template.pid)
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(run_forever, template)
                async with template.fork() as forked:
                    pids.append(forked.pid)
                    task_group.start_soon(run_forever, forked)
                    await anyio.sleep_forever()
    assert len(pids) == 4
    assert not any(process_exists(pid) for pid in pids)


async def test_a_template_busy_in_a_long_command_is_ended_promptly() -> None:
    with anyio.fail_after(3):
        with anyio.move_on_after(0.3):
            async with trio_fork.open_template(preload=["time"]) as template:
                await template.eval("import time; time.sleep(60)")
        with anyio.move_on_after(0.3):
            async with trio_fork.open_template() as template:
                await template.eval("import time\nwhile True: time.sleep(0.001)")


async def test_a_template_killed_from_outside_breaks_promptly() -> None:
    async with trio_fork.open_template() as template:
        async with anyio.create_task_group() as task_group:
            failures: list[BaseException] = []

            async def pending_command() -> None:
                try:
                    await template.eval("import time; time.sleep(30)")
                except trio_fork.BrokenTemplateError as exc:
                    failures.append(exc)

            # Leaving the block reports it too: the child's exit status died with the template.
            with pytest.raises(trio_fork.BrokenTemplateError):
                async with template.spawn(targets.sleep_forever) as child:
                    await receive(child.stream)
                    task_group.start_soon(pending_command)
                    await anyio.sleep(0.1)
                    with anyio.fail_after(5):
                        os.kill(template.pid, signal.SIGKILL)
                        with pytest.raises(trio_fork.BrokenTemplateError):
                            await child.wait()
            # Dead, but orphaned: an init that does not reap leaves it a zombie.
            assert not process_alive(child.pid)
        assert len(failures) == 1
        with pytest.raises(trio_fork.BrokenTemplateError):
            await template.require("json")
        with pytest.raises(trio_fork.BrokenTemplateError):
            async with template.spawn(targets.nothing):
                pass


async def test_many_sequential_spawns_leak_nothing() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        for _ in range(100):
            async with template.spawn(targets.one_byte) as child:
                assert await child.stream.receive() == b"x"
            assert child.returncode == 0
        assert set(ours()) == {template.pid}


async def test_cancelled_spawns_leave_nothing_once_the_template_ends() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        for delay in (0, 0.0005, 0.001, 0.002, 0.005):
            with anyio.move_on_after(delay):
                async with template.spawn(targets.sleep_forever) as child:
                    await receive(child.stream)
        async with template.spawn(targets.nothing):
            pass


async def test_commands_to_a_template_already_dead_fail_promptly() -> None:
    # The command is flushed at once, finds the template gone and breaks the channel
    # before its caller starts waiting: the caller must still hear about it.
    for command in ("spawn", "require", "fork"):
        async with trio_fork.open_template(preload=["tests.targets"]) as template:
            os.kill(template.pid, signal.SIGKILL)
            # Blocking on purpose: the channel's reader task must not run meanwhile.
            while process_alive(template.pid):
                time.sleep(0.001)  # noqa: ASYNC251
            with anyio.fail_after(5), pytest.raises(trio_fork.BrokenTemplateError):
                if command == "spawn":
                    async with template.spawn(targets.nothing):
                        pass
                elif command == "require":
                    await template.require("json")
                else:
                    async with template.fork():
                        pass


async def test_a_cancelled_block_can_still_use_its_template_in_shielded_cleanup() -> None:
    # Cancelling the block does not cancel the template's channel: it stays usable
    # until the block ends it, and a cancellation never turns into BrokenTemplateError.
    with anyio.move_on_after(0.1) as scope:
        async with trio_fork.open_template() as template:
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True), anyio.fail_after(5):
                    await template.eval("CLEANED_UP = True")
    assert scope.cancelled_caught
