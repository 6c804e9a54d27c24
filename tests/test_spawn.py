"""Children: running targets, exit statuses, signals and what they hold."""

from __future__ import annotations

import os
import pickle
import signal
import socket

import anyio
import pytest

import trio_fork
from tests import targets
from tests.helpers import libffi, ours, receive

pytestmark = pytest.mark.anyio


@pytest.fixture
async def template() -> trio_fork.Template:  # type: ignore[misc]
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        yield template


async def test_child_talks_over_a_blocking_socket(template: trio_fork.Template) -> None:
    async with template.spawn(targets.echo) as child:
        assert child.returncode is None
        assert isinstance(child.stream, anyio.abc.UNIXSocketStream)
        await child.stream.send(b"ping")
        assert await child.stream.receive() == b"ping"
        await child.stream.send_eof()
        assert await child.wait() == 0
    assert child.returncode == 0
    assert "exited with status 0" in repr(child)


async def test_string_and_callable_targets_are_equivalent(template: trio_fork.Template) -> None:
    async with template.spawn("tests.targets:report_args", 1) as child:
        assert await receive(child.stream) == [1]
    async with template.spawn(targets.report_args, 2) as child:
        assert await receive(child.stream) == [2]


async def test_child_has_its_own_pid_and_the_template_as_parent(
    template: trio_fork.Template,
) -> None:
    async with template.spawn(targets.report_environment) as child:
        env = await receive(child.stream)
    assert env["pid"] == child.pid
    assert env["ppid"] == template.pid
    assert env["blocking"] is True


@pytest.mark.parametrize(
    ("target", "args", "status"),
    [
        (targets.nothing, (), 0),
        (targets.exit_with, (None,), 0),
        (targets.exit_with, (3,), 3),
        (targets.exit_with, ("a message",), 1),
        (targets.os_exit, (5,), 5),
        (targets.raise_value_error, ("boom",), 1),
        (targets.segfault, (), -signal.SIGSEGV),
        (targets.kill_self, (signal.SIGUSR1,), -signal.SIGUSR1),
    ],
)
async def test_exit_statuses(
    template: trio_fork.Template, target: object, args: tuple[object, ...], status: int
) -> None:
    async with template.spawn(target, *args) as child:  # type: ignore[arg-type]
        assert await child.wait() == status
    assert child.returncode == status


async def test_exception_traceback_goes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    # The template is opened here, not by a fixture, so that it inherits capfd's stderr.
    async with (
        trio_fork.open_template() as template,
        template.spawn(targets.raise_value_error, "a distinctive message") as child,
    ):
        pass
    assert child.returncode == 1
    err = capfd.readouterr().err
    assert "Traceback" in err
    assert "ValueError: a distinctive message" in err


async def test_child_stdio_is_ours(capfd: pytest.CaptureFixture[str]) -> None:
    async with (
        trio_fork.open_template() as template,
        template.spawn(targets.print_and_exit, "to stdout", "to stderr"),
    ):
        pass
    out, err = capfd.readouterr()
    assert "to stdout" in out
    assert "to stderr" in err


async def test_kill_terminate_and_send_signal(template: trio_fork.Template) -> None:
    for method, sig in [("kill", signal.SIGKILL), ("terminate", signal.SIGTERM)]:
        async with template.spawn(targets.sleep_forever) as child:
            await receive(child.stream)
            getattr(child, method)()
            assert await child.wait() == -sig
    async with template.spawn(targets.sleep_forever) as child:
        await receive(child.stream)
        child.send_signal(signal.SIGUSR2)
        assert await child.wait() == -signal.SIGUSR2
        child.kill()  # after exit: nothing happens
        child.send_signal(signal.SIGTERM)


async def test_child_starts_with_a_fresh_signal_state(template: trio_fork.Template) -> None:
    await template.eval("import signal; signal.signal(signal.SIGUSR1, signal.SIG_IGN)")
    await template.eval("signal.signal(signal.SIGHUP, lambda *a: None)")
    await template.eval("signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])")
    async with template.spawn(targets.report_signals) as child:
        state = await receive(child.stream)
    assert state["default_int"] is True
    assert state["handlers"]["SIGTERM"] == signal.SIG_DFL
    assert state["handlers"]["SIGCHLD"] == signal.SIG_DFL
    assert state["handlers"]["SIGUSR1"] == signal.SIG_DFL
    assert state["handlers"]["SIGHUP"] == signal.SIG_DFL
    assert state["handlers"]["SIGPIPE"] == signal.SIG_IGN
    assert state["wakeup_fd"] == -1
    assert state["mask"] == []


async def test_async_target_runs_on_our_backend(
    template: trio_fork.Template, anyio_backend: str
) -> None:
    await template.require("anyio", "trio")
    async with template.spawn(targets.async_echo, "arg") as child:
        kind, backend, args = pickle.loads(await child.stream.receive())
        assert (kind, backend, args) == ("UNIXSocketStream", anyio_backend, ("arg",))
        await child.stream.send(b"again")
        assert await child.stream.receive() == b"again"
    assert child.returncode == 0
    async with template.spawn(targets.async_fail) as child:
        pass
    assert child.returncode == 1


async def test_unresolvable_targets_raise_remote_error_and_leave_no_process(
    template: trio_fork.Template,
) -> None:
    cases = [
        ("tests.targets:no_such_function", "AttributeError"),
        ("no_such_module_anywhere:f", "ModuleNotFoundError"),
        ("tests.targets:NOT_CALLABLE", "TypeError"),
    ]
    for target, type_name in cases:
        with pytest.raises(trio_fork.RemoteError) as info:
            async with template.spawn(target):
                pytest.fail("the child should not start")
        assert info.value.type_name == type_name
        assert set(ours()) == {template.pid}
    async with template.spawn(targets.nothing):
        pass


class _FailsToUnpickle:
    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (int, ("not a number",))


async def test_arguments_that_do_not_unpickle_in_the_child(template: trio_fork.Template) -> None:
    with pytest.raises(trio_fork.RemoteError) as info:
        async with template.spawn(targets.report_args, _FailsToUnpickle()):
            pass
    assert info.value.type_name == "ValueError"
    assert set(ours()) == {template.pid}


async def test_forty_concurrent_spawns(template: trio_fork.Template) -> None:
    results: dict[int, object] = {}

    async def one(index: int) -> None:
        async with template.spawn(targets.report_raw_args, index) as child:
            results[index] = await receive(child.stream)

    async with anyio.create_task_group() as task_group:
        for index in range(40):
            task_group.start_soon(one, index)
    assert results == {index: (index,) for index in range(40)}


async def test_an_eight_mebibyte_argument(template: trio_fork.Template) -> None:
    data = os.urandom(8 * 1024 * 1024)
    async with template.spawn(targets.report_length, data) as child:
        assert await receive(child.stream) == (len(data), data[:4], data[-4:])


async def test_fds_given_to_spawn_arrive_last(template: trio_fork.Template) -> None:
    read_ends, write_ends = zip(*(os.pipe() for _ in range(3)), strict=True)
    try:
        async with template.spawn(targets.write_to_fds, fds=write_ends) as child:
            pass
        assert child.returncode == 0
        for index, read_end in enumerate(read_ends):
            os.close(write_ends[index])
            assert os.read(read_end, 100) == f"written by child to fd #{index}".encode()
    finally:
        for fd in read_ends:
            os.close(fd)


async def test_fd_passing_over_the_child_stream(template: trio_fork.Template) -> None:
    read_end, write_end = os.pipe()
    try:
        async with template.spawn(targets.receive_fd_and_write) as child:
            await child.stream.send_fds(b"hello via fd", [write_end])
            assert await receive(child.stream) == 1
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 100) == b"hello via fd"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    async with template.spawn(targets.send_back_a_pipe) as child:
        message, fds = await child.stream.receive_fds(1, 1)
    assert message == b"p"
    try:
        assert os.read(fds[0], 100) == b"through a pipe from the child"
    finally:
        os.close(fds[0])


async def test_child_holds_only_its_socket_and_what_was_sent(
    template: trio_fork.Template,
) -> None:
    first, second = socket.socketpair()
    with first, second:
        await template.send_fds(first)
        async with anyio.create_task_group() as task_group:
            # Siblings are running while the child starts: none of their sockets leak.
            for _ in range(5):
                task_group.start_soon(_hold_a_sibling, template)
            await anyio.sleep(0.05)
            async with template.spawn(targets.report_environment, fds=[second]) as child:
                env = await receive(child.stream)
            task_group.cancel_scope.cancel()
        sent = {f"socket:[{os.fstat(end.fileno()).st_ino}]" for end in (first, second)}
    fds = env["fds"]
    others = sorted(t for fd, t in fds.items() if fd > 2 and fd not in {env["sock"], *libffi(fds)})
    assert sorted(fds)[:3] == [0, 1, 2]
    assert others == sorted(sent), fds


async def _hold_a_sibling(template: trio_fork.Template) -> None:
    async with template.spawn(targets.sleep_forever) as child:
        await receive(child.stream)
        await anyio.sleep_forever()
