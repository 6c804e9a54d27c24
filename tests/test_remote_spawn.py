"""A remote template's spawn keeps the local spawn's promises (one code, trio_fork/_spawn.py).

Against a real sshd (tests/sshd.py), on both backends: a cancelled spawn kills its
child before closing its stream, at any point; leaving a cancelled block takes
bounded time even when the template there is busy or stopped; a remote template
refuses other event loops; descriptors are refused, never lost. Scenarios that would
hang if a promise were broken run in an interpreter of their own, killed after a hard
time limit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

import trio_fork
from tests import rpc_functions, targets
from tests.helpers import alive_below, process_alive, receive, run_isolated, until
from tests.sshd import SshTarget
from tests.test_reliability import _CancelAtYield
from tests.test_remote import REMOTE_PYTHON, remote
from trio_fork._remote import open_remote_template

pytestmark = pytest.mark.anyio


# A cancelled spawn ----------------------------------------------------------------------


async def scenario_cancelled_remote_spawns(
    command: list[str], count: int, journal: str
) -> dict[str, Any]:
    entered = 0
    alive_after: list[int] = []
    async with open_remote_template(command, python=REMOTE_PYTHON) as template:
        took = []
        for _ in range(5):
            started = anyio.current_time()
            async with template.spawn("tests.targets:nothing"):
                took.append(anyio.current_time() - started)
        typical = sorted(took)[len(took) // 2]
        for index in range(count):
            with anyio.CancelScope() as scope:
                if index % 2:
                    scope.deadline = anyio.current_time() + typical * (index % 7) / 3
                else:
                    scope.cancel()  # at its first wait: SPAWN is sent, STARTED is not in
                async with template.spawn("tests.targets:journal_start_and_end_of_file", journal):
                    entered += 1
                    await anyio.sleep_forever()
            alive_after += alive_below(template.pid)
    entries = rpc_functions.read_journal(journal)
    return {
        "cancelled before the block": count - entered,
        "targets started": sum(entry.startswith("start") for entry in entries),
        "targets that saw end of file": [entry for entry in entries if entry.startswith("eof")],
        "alive after the cancellation": alive_after,
    }


def test_a_cancelled_remote_spawn_kills_before_it_closes_and_prints_nothing(
    ssh_target: SshTarget, anyio_backend: str, tmp_path: Path
) -> None:
    # The kill goes on the template's channel, the end of the stream on a stream of
    # its own: closing first would let the child see end of file before the kill.
    result, stderr = run_isolated(
        scenario_cancelled_remote_spawns,
        anyio_backend,
        ssh_target.command,
        60,
        str(tmp_path / "journal"),
    )
    assert result["cancelled before the block"] >= 30
    assert result["targets that saw end of file"] == []
    assert result["alive after the cancellation"] == []
    assert stderr == ""


async def test_cancellation_at_every_point_of_a_remote_spawn(ssh_target: SshTarget) -> None:
    async with remote(ssh_target) as template:

        async def spawn() -> None:
            async with template.spawn(targets.nothing, 1) as child:
                pass
            assert child.returncode == 0

        for n in range(1000):
            with anyio.CancelScope() as scope:
                await _CancelAtYield(spawn(), scope, n)
            assert alive_below(template.pid) == [], f"after a cancel at yield {n}"
            if not scope.cancel_called:
                break
        # How many times a spawn yields depends on what has arrived when it looks (two
        # at least: the request sent, the start awaited): each of them was tried.
        assert n >= 2
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


# Leaving a cancelled block takes bounded time ----------------------------------------------


async def scenario_leaving_a_cancelled_remote_spawn_block(
    command: list[str], case: str, marker: str
) -> dict[str, Any]:
    async with open_remote_template(command, python=REMOTE_PYTHON) as template:
        async with anyio.create_task_group() as group:
            async with template.spawn("tests.targets:sleep_forever") as child:
                pid = await receive(child.stream)
                if case == "busy":
                    code = f"import time\nopen({marker!r}, 'w').close()\ntime.sleep(3600)"
                    group.start_soon(template.eval, code)
                    await until(lambda: os.path.exists(marker))
                else:
                    os.kill(template.pid, signal.SIGSTOP)  # the same machine, over ssh
                group.cancel_scope.cancel()
                await anyio.sleep_forever()
        left = {"child alive": process_alive(pid), "returncode": child.returncode}
        # Leaving the template's own block is bounded too, busy or stopped.
    return left


@pytest.mark.parametrize("case", ["busy", "stopped"])
def test_leaving_a_cancelled_remote_spawn_block_takes_bounded_time(
    ssh_target: SshTarget, anyio_backend: str, case: str, tmp_path: Path
) -> None:
    # The template there cannot report the child's end; the relay killed it through
    # its pidfd, which is trusted after a bounded wait.
    result, _ = run_isolated(
        scenario_leaving_a_cancelled_remote_spawn_block,
        anyio_backend,
        ssh_target.command,
        case,
        str(tmp_path / "busy"),
    )
    assert result == {"child alive": False, "returncode": None}


async def test_a_child_that_ends_before_it_starts_says_how(ssh_target: SshTarget) -> None:
    async with remote(ssh_target) as template:
        async with template.fork() as forked:
            # Every fork of it exits at once, before its child can confirm its start.
            await forked.eval("import os\nos.register_at_fork(after_in_child=lambda: os._exit(7))")
            with pytest.raises(trio_fork.BrokenTemplateError, match="ended with status 7 before"):
                async with forked.spawn(targets.nothing):
                    pytest.fail("the child cannot have started")
            assert alive_below(forked.pid) == []
        # The template it was forked from is untouched.
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


# One event loop ----------------------------------------------------------------------------


async def test_a_remote_template_used_from_another_event_loop_refuses(
    ssh_target: SshTarget, anyio_backend: str
) -> None:
    async with remote(ssh_target) as template:

        async def spawn() -> None:
            async with template.spawn(targets.nothing):
                pass

        async def fork() -> None:
            async with template.fork():
                pass

        uses = {
            "eval": lambda: template.eval("x = 1"),
            "require": lambda: template.require("json"),
            "send_args": lambda: template.send_args(1),
            "spawn": spawn,
            "fork": fork,
        }

        def in_another_event_loop(use: Any) -> str:
            async def main() -> None:
                await use()

            try:
                anyio.run(main, backend=anyio_backend)
            except RuntimeError as exc:
                return str(exc)
            return "no error"

        for name, use in uses.items():
            message = await anyio.to_thread.run_sync(in_another_event_loop, use)
            assert "belongs to the event loop that opened it" in message, name
        # Untouched, and usable from its own event loop.
        await template.eval("x = 2")
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


# Descriptors are refused, never lost ------------------------------------------------------


async def test_descriptors_are_refused_on_a_remote_child_stream(ssh_target: SshTarget) -> None:
    async with remote(ssh_target) as template:
        async with template.spawn("tests.targets:echo") as child:
            with pytest.raises(TypeError, match="cannot cross hosts"):
                await child.stream.send_fds(b"x", [0])
            with pytest.raises(TypeError, match="cannot cross hosts"):
                await child.stream.receive_fds(1, 1)
            # The stream is whole: nothing of the refused message went.
            await child.stream.send(b"ping")
            assert await child.stream.receive() == b"ping"
            sock = await child.detach_stream()
            sock.close()
        assert child.returncode == 0
