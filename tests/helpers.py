"""Parent-side helpers for the tests."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest
from anyio.abc import ByteReceiveStream
from anyio.streams.buffered import BufferedByteReceiveStream

_LENGTH = struct.Struct("<I")


async def receive(stream: ByteReceiveStream) -> Any:
    """One message sent by ``tests.targets.send``."""
    buffered = BufferedByteReceiveStream(stream)
    (length,) = _LENGTH.unpack(await buffered.receive_exactly(_LENGTH.size))
    data = await buffered.receive_exactly(length)
    assert not buffered.buffer, "a second message arrived with the first"
    return pickle.loads(data)


def parent_side_modules(modules: object) -> list[str]:
    """The modules of trio_fork's parent side among ``modules`` (a template has none)."""
    return [
        name
        for name in modules  # type: ignore[attr-defined]
        if name.startswith("trio_fork.") and not name.startswith("trio_fork.worker")
    ]


def fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def libffi(fds: dict[int, str]) -> set[int]:
    """Which of ``fds`` (fd -> what it refers to) is libffi's: the one exception.

    From Python 3.14, the ``_ctypes`` that templates use for ``prctl`` opens libffi.so
    (when libffi uses static trampolines, as Debian's does) and keeps it: every
    process forked from a template holds it (see docs/reliability.md).
    """
    found = {fd for fd, target in fds.items() if os.path.basename(target).startswith("libffi.so")}
    assert len(found) <= (sys.version_info >= (3, 14)), fds
    return found


def process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process that has not been reaped (zombies count)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return bool(file.read())
    except (FileNotFoundError, ProcessLookupError):  # gone while being read: ESRCH
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is running (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except (FileNotFoundError, ProcessLookupError):  # gone while being read: ESRCH
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def dead_within(pids: list[int], seconds: float) -> bool:
    """Poll, blocking, until no process of ``pids`` runs; whether that came in time."""
    deadline = time.monotonic() + seconds
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


async def wait_until_dead(pid: int, seconds: float = 5.0) -> None:
    """Poll until ``pid`` is not running: process states have no event to wait on."""
    with anyio.fail_after(seconds):
        while process_alive(pid):  # noqa: ASYNC110
            await anyio.sleep(0.01)


def process_table() -> dict[int, tuple[int, str]]:
    """Every process now: pid -> (parent pid, "pid (name) state")."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), f"{stat[: stat.rindex(')') + 1]} {fields[0]}")
    return table


def descendants(
    root: int | None = None, table: dict[int, tuple[int, str]] | None = None
) -> dict[int, str]:
    """Every process below ``root`` (default: this one), zombies included: pid -> state.

    ``table`` is a ``process_table()`` to read instead of the processes now, so that
    several questions can be answered about one moment.
    """
    root = os.getpid() if root is None else root
    parents = process_table() if table is None else table
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, description) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = description
                frontier.append(pid)
    return found


def ours() -> dict[int, str]:
    """``descendants()`` but the default template, which open_template() keeps running.

    What is below the default template (templates still open, their children) counts.
    """
    from trio_fork import _open

    handle = _open._default.handle
    found = descendants()
    if handle is not None:
        found.pop(handle.pid, None)
    return found


# Processes apart from this one that serve many tests, such as the test sshds of
# tests/sshd.py: pid -> what. What runs below them is what the tests made them do.
session_processes: dict[int, str] = {}


def leftover_processes(grace: float = 5.0) -> dict[int, str]:
    """What a test left behind: ``descendants()``, and what runs below the session processes.

    The latter (the remote side of an ssh connection, below a test sshd) ends a moment
    after its client, so while nothing else is left this waits, ``grace`` seconds at
    most, for it to go.
    """
    deadline = time.monotonic() + grace
    while True:
        table = process_table()
        local = descendants(table=table)
        below: dict[int, str] = {}
        for pid in session_processes:
            below |= descendants(pid, table)
        if local or not below or time.monotonic() >= deadline:
            return local | below
        time.sleep(0.01)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (30 s at most) until ``condition()``, which looks at another process's doing."""
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110 (nothing here could set an Event)
            await anyio.sleep(0.005)


@asynccontextmanager
async def cancelled_when(condition: Callable[[], bool]) -> AsyncIterator[anyio.CancelScope]:
    """A cancel scope that is cancelled once ``condition()`` holds, whatever its body does."""
    async with anyio.create_task_group() as group:
        scope = anyio.CancelScope()

        async def watch() -> None:
            await until(condition)
            scope.cancel()

        group.start_soon(watch)
        with scope:
            yield scope
        group.cancel_scope.cancel()


# Scenarios in an interpreter of their own ----------------------------------------------

_ROOT = Path(__file__).resolve().parent.parent
# Far beyond what any scenario takes when nothing hangs.
HARD_LIMIT = 60.0
_RUNNER = """
import importlib, json, sys
import anyio
import pytest
scenario = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
print(json.dumps(anyio.run(scenario, *json.loads(sys.argv[4]), backend=sys.argv[3])))
"""


class Outcome(NamedTuple):
    result: Any
    stderr: str


def run_isolated(
    scenario: Callable[..., Awaitable[Any]], backend: str, *args: Any, limit: float = HARD_LIMIT
) -> Outcome:
    """Run ``scenario(*args)`` on ``backend`` in a new interpreter: what it returned.

    For what may hang or leave processes behind: killed with its whole session after
    ``limit`` seconds, failing the test. ``scenario`` is a module-level coroutine
    function of a module under ``tests``; its arguments and result travel as JSON.
    """
    command = [
        sys.executable,
        "-c",
        _RUNNER,
        scenario.__module__,
        scenario.__name__,
        backend,
        json.dumps(args),
    ]
    with subprocess.Popen(
        command,
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hung one goes with everything below it
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{scenario.__name__} hung: killed after {limit:g} s\n{stderr[-4000:]}")
    assert process.returncode == 0, f"{scenario.__name__} failed:\n{stderr[-4000:]}"
    return Outcome(json.loads(stdout.splitlines()[-1]), stderr)


def alive_below(pid: int) -> list[int]:
    """The processes below ``pid`` that still run (zombies are dead)."""
    return [below for below in descendants(pid) if process_alive(below)]
