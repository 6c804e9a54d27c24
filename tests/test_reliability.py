"""The guarantees of the "Reliability and security" page, one test (or more) each."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import trio_fork
from tests import targets
from tests.helpers import (
    descendants,
    libffi,
    ours,
    process_alive,
    process_exists,
    receive,
    wait_until_dead,
)
from trio_fork import _open

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def raised_fd_limit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096)
    if wanted < 2000:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# 1. No orphans ------------------------------------------------------------------------


@pytest.mark.parametrize("default", ["default template", "fresh templates"])
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_no_orphans_when_the_parent_is_killed(backend: str, default: str) -> None:
    # The subreaper stands in for an init that reaps orphans; it reports when each
    # process below it was reaped, counted from the parent's death.
    command = [sys.executable, "-m", "tests.scripts.subreaper"]
    command += [sys.executable, "-m", "tests.scripts.tree", backend]
    env = dict(os.environ, TRIO_FORK_DEFAULT_TEMPLATE="1" if default == "default template" else "0")
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env) as wrapper:
        assert wrapper.stdout is not None
        tree = json.loads(wrapper.stdout.readline())
        os.kill(tree["parent"], signal.SIGKILL)
        report = json.loads(wrapper.stdout.readline())
        assert wrapper.wait(timeout=10) == 0
    reaped = {int(pid): after for pid, after in report["reaped"].items()}
    # Templates reap what they made before they exit; what they orphan (only the
    # templates themselves here: the default template, or the two the parent started)
    # is reaped by the subreaper. Either way nothing is left, and the last process went
    # within 2 s of the parent's death.
    orphans = [tree["default"]] if tree["default"] else tree["templates"][:2]
    assert (tree["default"] is None) == (default == "fresh templates")
    everyone = [tree["parent"], *tree["templates"], *tree["children"], *orphans]
    assert not [pid for pid in everyone if process_exists(pid)]
    assert set(orphans) <= set(reaped)
    late = {pid: after for pid, after in reaped.items() if after > 2}
    assert not late, f"gone only after more than 2 s: {late}"


# 2. Ctrl-C ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_ctrl_c_ends_everything_and_templates_print_nothing(backend: str) -> None:
    command = [sys.executable, "-m", "tests.scripts.tree", backend]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as parent:
        assert parent.stdout is not None
        assert parent.stderr is not None
        tree = json.loads(parent.stdout.readline())
        started = time.monotonic()
        os.killpg(parent.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        stderr = parent.stderr.read()
        parent.wait(timeout=10)
        elapsed = time.monotonic() - started
    assert "KeyboardInterrupt" in stderr
    assert "trio_fork/worker/" not in stderr, f"a template printed a traceback:\n{stderr}"
    assert elapsed < 2
    everyone = [*tree["templates"], *tree["children"]]
    assert not [pid for pid in everyone if process_alive(pid)]
    assert not descendants()


# 3. Template death --------------------------------------------------------------------


async def test_a_forked_template_killed_from_outside() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        with pytest.raises(trio_fork.BrokenTemplateError):
            async with template.fork() as forked:
                async with forked.spawn(targets.sleep_forever) as child:
                    await receive(child.stream)
                    os.kill(forked.pid, signal.SIGKILL)
                    with anyio.fail_after(5), pytest.raises(trio_fork.BrokenTemplateError):
                        await child.wait()
        await wait_until_dead(child.pid)
        # The template it was forked from is not disturbed.
        async with template.spawn(targets.one_byte) as sibling:
            assert await sibling.stream.receive() == b"x"


# 4. Fault isolation -------------------------------------------------------------------


async def test_a_crashing_child_disturbs_neither_template_nor_siblings() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        async with anyio.create_task_group() as task_group:

            async def sibling(*, task_status: anyio.abc.TaskStatus[trio_fork.Child]) -> None:
                async with template.spawn(targets.echo) as child:
                    task_status.started(child)
                    await anyio.sleep_forever()

            siblings = [await task_group.start(sibling) for _ in range(3)]

            async with template.spawn(targets.segfault) as child:
                pass
            assert child.returncode == -signal.SIGSEGV
            async with template.spawn(targets.os_exit, 7) as child:
                pass
            assert child.returncode == 7
            async with template.spawn(targets.sleep_forever) as child:
                await receive(child.stream)
                os.kill(child.pid, signal.SIGKILL)  # as the OOM killer does
            assert child.returncode == -signal.SIGKILL
            async with template.spawn(targets.exhaust_memory) as child:
                pass
            assert child.returncode == 1

            for running in siblings:
                await running.stream.send(b"still there?")
                assert await running.stream.receive() == b"still there?"
                assert running.returncode is None
            task_group.cancel_scope.cancel()
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


# 5. File descriptor hygiene -----------------------------------------------------------


async def test_nothing_of_ours_is_inherited_by_accident() -> None:
    # Descriptors marked inheritable are the ones a careless fork+exec would leak.
    leaky = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    for fd in leaky:
        os.set_inheritable(fd, True)
    try:
        async with (
            trio_fork.open_template(preload=["tests.targets"]) as template,
            template.spawn(targets.report_environment) as child,
        ):
            env = await receive(child.stream)
    finally:
        for fd in leaky:
            os.close(fd)
    assert set(env["fds"]) - libffi(env["fds"]) == {0, 1, 2, env["sock"]}


async def test_received_descriptors_are_close_on_exec() -> None:
    read_end, write_end = os.pipe()
    try:
        async with trio_fork.open_template(preload=["tests.targets"]) as template:
            await template.send_fds(read_end)
            async with template.spawn(targets.report_cloexec, fds=[write_end]) as child:
                flags = await receive(child.stream)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert flags == {"sock": True, "fds": [True, True]}


@pytest.mark.usefixtures("raised_fd_limit")
async def test_any_number_of_descriptors_in_one_call() -> None:
    # More than the kernel takes in one message (253), in both directions of use.
    count = 600
    read_end, write_end = os.pipe()
    identities = sorted(
        [targets.fd_identity_of_pipe(read_end), targets.fd_identity_of_pipe(write_end)]
    )
    try:
        async with trio_fork.open_template(preload=["tests.targets"]) as template:
            await template.send_fds(*[read_end] * count)
            async with template.spawn(targets.report_fd_count, fds=[write_end] * count) as child:
                reported = await receive(child.stream)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert reported == {"count": 2 * count, "identities": identities}


async def test_a_truncated_control_message_is_an_error_not_a_silent_loss() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        # The template can hold only a few more descriptors than it has now.
        await template.eval(
            "import os, resource\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')) + 4, "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[1]))"
        )
        with pytest.raises(trio_fork.RemoteError, match="lost in transit"):
            await template.send_fds(*[0] * 40)
        await template.eval(
            "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[1]))"
        )
        async with template.spawn(targets.report_args) as child:
            assert await receive(child.stream) == []


# 6. Cancellation anywhere -------------------------------------------------------------


class _CancelAtYield:
    """Run ``coro``, cancelling ``scope`` when it yields to the event loop the Nth time.

    Each yield of the operation's own task is a point where a cancellation can land;
    trying every N until the operation completes tries them all.
    """

    def __init__(self, coro: Awaitable[Any], scope: anyio.CancelScope, n: int) -> None:
        self.coro = coro
        self.scope = scope
        self.n = n
        self.yields = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.coro.__await__()
        to_send: Any = None
        to_throw: BaseException | None = None
        while True:
            try:
                if to_throw is not None:
                    request = inner.throw(to_throw)
                else:
                    request = inner.send(to_send)
            except StopIteration as stop:
                return stop.value
            if self.yields == self.n:
                self.scope.cancel()
            self.yields += 1
            to_send, to_throw = None, None
            try:
                to_send = yield request
            except BaseException as exc:
                to_throw = exc


async def _every_cancellation_point(operation: Callable[[], Awaitable[None]]) -> int:
    """Cancel ``operation`` at each of its yields in turn; how many there were."""
    for n in range(1000):
        fds_before = targets.open_fds()
        with anyio.CancelScope() as scope:
            trampoline = _CancelAtYield(operation(), scope, n)
            await trampoline
        # Started again by the next operation: its start is cancelled at every point too.
        _open._stop_default()
        assert not descendants(), f"processes left after a cancel at yield {n}"
        leaked = {fd: name for fd, name in targets.open_fds().items() if fds_before.get(fd) != name}
        assert not leaked, f"descriptors leaked after a cancel at yield {n}: {leaked}"
        if not scope.cancel_called:
            return n
    raise AssertionError("the operation never completed")


async def test_cancellation_at_every_point_of_open_template_fork_and_spawn() -> None:
    # Only trio_fork's own operations: a cancelled anyio stream receive on asyncio can
    # make anyio call set_result on a cancelled future (an anyio bug, not ours).
    async def open_fork_and_spawn() -> None:
        async with trio_fork.open_template(preload=["tests.targets"]) as template:
            async with template.fork() as forked, forked.spawn(targets.nothing) as child:
                pass
            assert child.returncode == 0
            async with template.spawn(targets.nothing, fds=[0]) as child:
                pass

    points = await _every_cancellation_point(open_fork_and_spawn)
    assert points > 10


async def test_cancellation_at_every_point_of_a_spawn_from_a_running_template() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:

        async def spawn() -> None:
            async with template.spawn(targets.nothing, 1, fds=[0]) as child:
                pass
            assert child.returncode == 0

        for n in range(1000):
            with anyio.CancelScope() as scope:
                await _CancelAtYield(spawn(), scope, n)
            assert set(ours()) == {template.pid}, f"after a cancel at yield {n}"
            if not scope.cancel_called:
                break
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


# 7. Bad input (the rest is in test_bad_input.py) --------------------------------------


async def test_a_preload_that_hangs_can_be_cancelled(tmp_path: Path) -> None:
    (tmp_path / "trio_fork_hangs_on_import.py").write_text("import time\ntime.sleep(600)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with anyio.fail_after(5), anyio.move_on_after(0.5) as scope:
            async with trio_fork.open_template(preload=["trio_fork_hangs_on_import"]):
                pytest.fail("the preload should hang")
    finally:
        sys.path.remove(str(tmp_path))
    assert scope.cancelled_caught


# 8. Signals ---------------------------------------------------------------------------


async def test_signals_go_through_a_pidfd() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        pidfds_before = [
            fd for fd, name in targets.open_fds().items() if name == "anon_inode:[pidfd]"
        ]
        async with template.spawn(targets.sleep_forever) as child:
            await receive(child.stream)
            pidfds = [
                fd
                for fd, name in targets.open_fds().items()
                if name == "anon_inode:[pidfd]" and _pidfd_pid(fd) == child.pid
            ]
            assert len(pidfds) == 1
            child.kill()
        assert child.returncode == -signal.SIGKILL
        pidfds_after = [
            fd for fd, name in targets.open_fds().items() if name == "anon_inode:[pidfd]"
        ]
        assert pidfds_after == pidfds_before  # the template's own, no more
        child.send_signal(signal.SIGTERM)  # reaped: nothing is sent to anyone


def _pidfd_pid(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as file:
        for line in file:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


async def test_many_children_exiting_at_once_are_all_reported() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        statuses: list[int] = []

        async def one(index: int) -> None:
            async with template.spawn(targets.exit_at, time.time() + 0.3, index) as child:
                statuses.append(await child.wait())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as task_group:
                for index in range(50):
                    task_group.start_soon(one, index)
    assert sorted(statuses) == list(range(50))


async def test_a_template_command_is_not_interrupted_by_sigchld(tmp_path: Path) -> None:
    # A blocking read straight from libc: without SA_RESTART on SIGCHLD it would fail
    # with EINTR when a child exits during it.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        async with template.spawn(targets.sleep_forever) as child:
            await receive(child.stream)
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(
                    template.eval,
                    "import ctypes, os\n"
                    "libc = ctypes.CDLL(None, use_errno=True)\n"
                    "fd = os.open(args[0], os.O_RDONLY)\n"
                    "buffer = ctypes.create_string_buffer(1)\n"
                    "got = libc.read(fd, buffer, 1)\n"
                    "os.close(fd)\n"
                    "assert got == 1, f'read returned {got}, errno {ctypes.get_errno()}'",
                    str(fifo),
                )
                writer = await anyio.to_thread.run_sync(os.open, fifo, os.O_WRONLY)
                try:
                    await anyio.sleep(0.1)
                    child.kill()
                    # The template cannot reap it before the command ends: poll.
                    await wait_until_dead(child.pid)
                    await anyio.sleep(0.1)
                    os.write(writer, b"x")
                finally:
                    os.close(writer)


async def test_templates_ignore_sigint(capfd: pytest.CaptureFixture[str]) -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        os.kill(template.pid, signal.SIGINT)
        await anyio.sleep(0.1)
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"
    assert "KeyboardInterrupt" not in capfd.readouterr().err


# 9. Exit hygiene ----------------------------------------------------------------------


async def test_children_skip_the_templates_exit_handlers_and_destructors(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    at_exit = tmp_path / "atexit"
    destructor = tmp_path / "destructor"
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        await template.eval(
            "import atexit\n"
            "atexit.register(lambda: open(args[0], 'w').close())\n"
            "class Resource:\n"
            "    def __del__(self):\n"
            "        open(args[1], 'w').close()\n"
            "RESOURCE = Resource()",
            str(at_exit),
            str(destructor),
        )
        async with template.spawn(targets.print_without_newline, "flushed at exit") as child:
            output = await child.stream.receive()
        assert child.returncode == 0
        assert output == b"ok"
        assert not at_exit.exists()
        assert not destructor.exists()
        assert "flushed at exit" in capfd.readouterr().out


# 10. Security -------------------------------------------------------------------------


def _unix_sockets() -> dict[int, str]:
    """inode -> path of every Unix socket on the machine ('' when it has none)."""
    sockets = {}
    with open("/proc/net/unix") as file:
        next(file)
        for line in file:
            fields = line.split()
            sockets[int(fields[6])] = fields[7] if len(fields) > 7 else ""
    return sockets


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


async def test_no_socket_anyone_else_could_reach() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        async with template.fork() as forked, forked.spawn(targets.echo) as child:
            await child.stream.send(b"x")
            await child.stream.receive()
            sockets = _unix_sockets()
            for pid in (template.pid, forked.pid, child.pid):
                for inode in _socket_inodes(pid):
                    assert sockets.get(inode) == "", f"process {pid} has a named socket"
            # A template holds its standard streams, its channel, its wakeup pipe and
            # the two ends of its group's guard. The pidfd that it sent with FORKED is
            # closed once sent, which may be after we had the reply: a command later,
            # it is surely gone.
            await template.eval("pass")
            fds = {
                int(fd): os.readlink(f"/proc/{template.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{template.pid}/fd")
            }
            assert len(fds) - len(libffi(fds)) == 8, str(fds)


# 11. Threads --------------------------------------------------------------------------


async def test_the_parent_may_run_threads_and_is_never_forked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_fork() -> int:
        raise AssertionError("trio_fork forked the parent")

    monkeypatch.setattr(os, "fork", no_fork)
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)
    busy.start()
    try:
        async with trio_fork.open_template(preload=["tests.targets"]) as template:
            async with template.fork() as forked, forked.spawn(targets.one_byte) as child:
                assert await child.stream.receive() == b"x"
    finally:
        stop.set()
        busy.join()


# 12. Soak -----------------------------------------------------------------------------


async def _soak(spawns: int) -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        for _ in range(50):
            async with template.spawn(targets.one_byte) as child:
                await child.stream.receive()
        fds = len(targets.open_fds())
        parent_rss, template_rss = _rss_kib(os.getpid()), _rss_kib(template.pid)
        for _ in range(spawns):
            async with template.spawn(targets.one_byte) as child:
                await child.stream.receive()
            assert child.returncode == 0
        assert len(targets.open_fds()) == fds
        # Generous bounds: the allocators keep some memory, a leak grows with the count.
        assert _rss_kib(os.getpid()) - parent_rss < 4096
        assert _rss_kib(template.pid) - template_rss < 2048


async def test_soak_sequential_spawns_leak_nothing() -> None:
    await _soak(300)


@pytest.mark.soak
async def test_soak_ten_thousand_sequential_spawns() -> None:
    await _soak(10_000)


def test_the_reliability_page_names_only_tests_that_exist() -> None:
    page = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", page))
    defined = set()
    for module in (ROOT / "tests").glob("test_*.py"):
        defined.update(re.findall(r"^(?:async )?def (test_\w+)", module.read_text(), re.M))
    assert len(named) > 20
    assert not named - defined
