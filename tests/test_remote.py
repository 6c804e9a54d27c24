"""Remote templates, over the real ssh client and a real sshd (tests/sshd.py).

The remote side runs ``sys.executable`` (a Python that has trio_fork installed, but
the relay runs the sources sent down the connection all the same) in the sshd's
login directory, where the ``tests`` package is not importable: what the children
import from it is forwarded from this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import trio_fork
from tests.helpers import dead_within, process_alive, receive
from tests.sshd import NetnsHost, SshServer, SshTarget
from trio_fork._remote import _MARKER, RemoteTemplate, open_remote_template, transport_command
from trio_fork.worker import _relay, _wire

pytestmark = pytest.mark.anyio

_ROOT = Path(__file__).resolve().parent.parent
# The interpreter this venv was made from: neither trio_fork nor the tests nor anyio
# are installed there, as on a host that has only Python.
REMOTE_PYTHON = getattr(sys, "_base_executable", sys.executable)


@asynccontextmanager
async def remote(target: SshTarget, **options: Any) -> AsyncIterator[RemoteTemplate]:
    async with open_remote_template(target.command, python=REMOTE_PYTHON, **options) as t:
        yield t


async def read_all(stream: Any) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def test_spawn_streams_both_ways_and_reports_the_exit(
    ssh_target: SshTarget, sshd_server: SshServer, capfd: pytest.CaptureFixture[str]
) -> None:
    async with remote(ssh_target) as template:
        assert template.pid in sshd_server.sessions()
        async with template.spawn("tests.targets:echo") as child:
            assert child.pid in sshd_server.sessions()
            await child.stream.send(b"ping")
            assert await child.stream.receive() == b"ping"
            await child.stream.send_eof()
            assert await read_all(child.stream) == b""
        assert child.returncode == 0
        async with template.spawn("tests.targets:exit_with", 3) as child:
            assert await child.wait() == 3
        async with template.spawn("tests.targets:sleep_forever") as child:
            child.terminate()
            assert await child.wait() == -signal.SIGTERM
    # The other side ended quietly: its stderr comes here.
    assert "Traceback" not in capfd.readouterr().err


async def test_commands_work_and_fail_as_locally(ssh_target: SshTarget) -> None:
    async with remote(ssh_target, preload=["json"]) as template:
        await template.eval(
            "import json\ndef dumped(sock, *a):\n    sock.sendall(json.dumps(a).encode())"
        )
        await template.send_args("queued")
        async with template.spawn("__main__:dumped", 1) as child:
            assert await read_all(child.stream) == b'["queued", 1]'
        with pytest.raises(trio_fork.RemoteError, match="ZeroDivisionError") as info:
            await template.eval("1 / 0")
        assert "1 / 0" in info.value.remote_traceback
        with pytest.raises(trio_fork.RemoteError, match="No module named 'no_such_module'"):
            await template.require("no_such_module")
        with pytest.raises(trio_fork.RemoteError, match="AttributeError"):
            async with template.spawn("tests.targets:no_such_target"):
                pass
        with pytest.raises(TypeError, match="cannot cross hosts"):
            await template.send_fds(0)
        with pytest.raises(TypeError, match="cannot cross hosts"):
            async with template.spawn("tests.targets:echo", fds=[0]):
                pass
        # Still in step after the refusals.
        async with template.fork() as forked:
            await forked.eval("X = 7")
            async with forked.spawn("tests.targets:report_args") as child:
                assert await receive(child.stream) == ["queued"]
        with pytest.raises(trio_fork.RemoteError, match="NameError"):
            await template.eval("X")
    with pytest.raises(anyio.ClosedResourceError):
        await template.eval("X = 1")
    with pytest.raises(anyio.ClosedResourceError):
        async with template.spawn("tests.targets:echo"):
            pass


async def test_many_children_at_once(ssh_target: SshTarget) -> None:
    async with remote(ssh_target) as template:

        async def one(index: int) -> None:
            async with template.spawn("tests.targets:echo") as child:
                message = b"child %d" % index
                await child.stream.send(message)
                await child.stream.send_eof()
                assert await read_all(child.stream) == message
            assert child.returncode == 0

        async with anyio.create_task_group() as task_group:
            for index in range(100):
                task_group.start_soon(one, index)


async def test_a_flooding_child_stalls_no_other_and_stays_bounded(ssh_target: SshTarget) -> None:
    async with remote(ssh_target) as template:
        await template.eval(
            "def flood(sock):\n    data = b'x' * 65536\n    while True:\n        sock.sendall(data)"
        )
        async with template.spawn("__main__:flood") as flood:
            # Nobody reads the flood; another child's stream still flows.
            for _ in range(3):
                async with template.spawn("tests.targets:echo") as child:
                    await child.stream.send(b"through")
                    assert await child.stream.receive() == b"through"
            mux = template._mux
            held = sum(sum(len(view) for view in s.pending) for s in list(mux._streams.values()))
            assert held <= _relay.WINDOW
            # It flows when read.
            total = 0
            while total < 10 * _relay.WINDOW:
                total += len(await flood.stream.receive())
            flood.kill()


async def test_large_messages_both_ways(ssh_target: SshTarget) -> None:
    size = 100 * 1024 * 1024
    async with remote(ssh_target) as template:
        await template.eval(
            "def length_then_data(sock, size):\n"
            "    got = 0\n"
            "    while got < size:\n"
            "        got += len(sock.recv(1 << 20))\n"
            "    sock.sendall(got.to_bytes(8, 'little') + bytes(size))\n"
        )
        async with template.spawn("__main__:length_then_data", size) as child:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(child.stream.send, bytes(size))
                data = bytearray()
                while len(data) < size + 8:
                    data += await child.stream.receive(1 << 20)
        assert int.from_bytes(data[:8], "little") == size
        assert len(data) == size + 8
        # A command as large, through the template's channel, cut in DATA frames.
        await template.eval(f"assert len(args[0]) == {size}", bytes(size))
        async with trio_fork.open_rpc(template, "tests.rpc_functions:length") as rpc:
            assert await rpc.call(bytes(size)) == size
        async with trio_fork.open_rpc(template, "tests.rpc_functions:make_bytes") as rpc:
            assert len(await rpc.call(size)) == size


async def test_rpc_and_pools_take_a_remote_template(ssh_target: SshTarget) -> None:
    async with remote(ssh_target) as template:
        async with trio_fork.open_rpc(template, "tests.rpc_functions:add") as rpc:
            assert await rpc.call(2, 3) == 5
            with pytest.raises(trio_fork.RemoteError, match="boom"):
                async with trio_fork.open_rpc(template, "tests.rpc_functions:fail") as failing:
                    await failing.call("boom")
        async with trio_fork.open_pool(template, "tests.rpc_functions:getpid", max=3) as pool:
            async with anyio.create_task_group() as task_group:
                for _ in range(20):
                    task_group.start_soon(pool.call)


async def test_a_remote_worker_serves_as_a_local_one(ssh_target: SshTarget) -> None:
    """An RPC worker's frames go between its connection and the mux with no local socket
    in between (see _mux_stream): calls from many tasks, larger than a stream's window,
    events, cancellations, deaths and broken frames all work as with a local worker."""
    window = 1024 * 1024
    async with remote(ssh_target) as template:
        async with trio_fork.open_rpc(template, "tests.rpc_functions:add") as rpc:
            sizes = [10, 3 * window, 100, 2 * window + 1]
            results: dict[int, bytes] = {}

            async def call(index: int) -> None:
                data = bytes([index]) * sizes[index % len(sizes)]
                results[index] = await rpc.call(data, b"!")

            async with anyio.create_task_group() as task_group:
                for index in range(40):
                    task_group.start_soon(call, index)
            for index in range(40):
                assert results[index] == bytes([index]) * sizes[index % len(sizes)] + b"!"
        async with trio_fork.open_rpc(template, "tests.rpc_functions:progress", events=True) as rpc:
            async with rpc.open_call(3) as progress:
                assert [event async for event in progress] == [{"step": n} for n in range(3)]
                assert await progress.result() == "done"
        async with trio_fork.open_rpc(template, "tests.rpc_functions:sleep_then_return") as rpc:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(rpc.call, 1, "first")
                await anyio.wait_all_tasks_blocked()
                with anyio.move_on_after(0.2) as scope:
                    await rpc.call(0, "second")  # queued behind the first: withdrawn
            assert scope.cancelled_caught
            assert await rpc.call(0, "third") == "third"
        async with trio_fork.open_rpc(template, "tests.rpc_functions:exit_now") as rpc:
            with pytest.raises(trio_fork.BrokenWorkerError, match="exited with status 3"):
                await rpc.call(3)
        async with trio_fork.open_rpc(template, "tests.rpc_functions:misbehave") as rpc:
            with pytest.raises(trio_fork.BrokenWorkerError, match="broke the protocol"):
                await rpc.call("unknown frame")
        # The template serves on, and nothing is left of the workers.
        async with trio_fork.open_rpc(template, "tests.rpc_functions:add") as rpc:
            assert await rpc.call(2, 3) == 5


async def test_import_forwarding_serves_this_process_modules_and_can_be_off(
    ssh_target: SshTarget,
) -> None:
    async with remote(ssh_target) as template:
        # The tests package is not on the remote sys.path: it came from here.
        await template.eval(
            "import tests.rpc_functions as m\n"
            "assert m.__spec__.origin == args[0], m.__spec__.origin\n",
            os.path.join(_ROOT, "tests", "rpc_functions.py"),
        )
        # Not the standard library, nor what is not there at all.
        with pytest.raises(trio_fork.RemoteError, match="No module named 'no_such_module'"):
            await template.require("no_such_module")
    async with remote(ssh_target, forward_imports=False) as template:
        with pytest.raises(trio_fork.RemoteError, match="No module named 'tests'"):
            await template.require("tests.rpc_functions")


async def test_env_and_cwd_apply_there_and_no_file_is_left(
    ssh_target: SshTarget, tmp_path: Path
) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "X": "1"}
    async with remote(ssh_target, env=env, cwd=tmp_path) as template:
        await template.eval(
            "import os\n"
            "def where(sock):\n"
            "    sock.sendall(repr((os.getcwd(), os.environ['X'])).encode())"
        )
        async with template.spawn("__main__:where") as child:
            assert eval(await read_all(child.stream)) == (str(tmp_path), "1")
        async with trio_fork.open_rpc(template, "tests.rpc_functions:add") as rpc:
            assert await rpc.call(1, 1) == 2
    assert list(tmp_path.iterdir()) == []


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{table}") as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if fields[3] in ("0A", "07"):  # LISTEN; an unconnected udp socket
                    inodes.add(fields[9])
    with open("/proc/net/unix") as file:
        for line in file.readlines()[1:]:
            fields = line.split()
            if fields[3] == "00010000":  # __SO_ACCEPTCON: listening
                inodes.add(fields[6])
    return inodes


async def test_nothing_listens_on_either_side(
    ssh_target: SshTarget, sshd_server: SshServer
) -> None:
    async with remote(ssh_target) as template:
        async with template.spawn("tests.targets:sleep_forever") as child:
            pids = [os.getpid(), *sshd_server.sessions()]
            listening = _listening_inodes()
            for pid in pids:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        assert link[8:-1] not in listening, (pid, link)
            child.kill()


async def test_a_connection_that_fails_carries_ssh_stderr(
    ssh_target: SshTarget, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.write_text(
        ssh_target.config.read_text().replace(str(ssh_target.identity), "/nonexistent")
    )
    with pytest.raises(trio_fork.BrokenTemplateError, match="Permission denied"):
        async with open_remote_template(["ssh", "-F", str(config), ssh_target.destination]):
            pass
    strange = tmp_path / "strange_config"
    strange.write_text(
        ssh_target.config.read_text().replace(str(ssh_target.known_hosts), "/dev/null")
    )
    with pytest.raises(trio_fork.BrokenTemplateError, match="Host key verification failed"):
        async with open_remote_template(["ssh", "-F", str(strange), ssh_target.destination]):
            pass
    with pytest.raises(trio_fork.BrokenTemplateError, match=r"no_such_python.*not found"):
        async with open_remote_template(ssh_target.command, python="no_such_python"):
            pass
    old = tmp_path / "old-python"
    old.write_text("#!/bin/sh\nprintf '\\ntrio_fork-python 3.6\\n'\n")
    old.chmod(0o755)
    with pytest.raises(trio_fork.BrokenTemplateError, match=r"is 3\.6, but trio_fork needs 3\.11"):
        async with open_remote_template(ssh_target.command, python=str(old)):
            pass
    with pytest.raises(ValueError, match="destination"):
        async with open_remote_template("-oProxyCommand=x"):
            pass
    with pytest.raises(trio_fork.BrokenTemplateError, match="cannot start the transport"):
        async with open_remote_template(["no-such-transport-command"]):
            pass


def test_the_transport_command() -> None:
    assert transport_command("me@far") == (
        ["ssh", "-T", "-o", "BatchMode=yes", "me@far", "sh"],
        "me@far",
    )
    assert transport_command(["docker", "exec", "-i", "box"]) == (
        ["docker", "exec", "-i", "box", "sh"],
        "docker exec -i box",
    )
    with pytest.raises(TypeError, match="destination"):
        transport_command([])
    with pytest.raises(TypeError, match="destination"):
        transport_command(["ssh", ""])


_CORRUPT = textwrap.dedent(
    """
    import os, subprocess, sys
    # Pass the remote side's output through, then corrupt it: after AFTER bytes,
    # garbage (or the end, in the middle of a frame).
    after, how, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    remote = subprocess.Popen(command, stdout=subprocess.PIPE)
    passed = 0
    while passed < after:
        data = os.read(remote.stdout.fileno(), after - passed)
        if not data:
            break
        os.write(1, data)
        passed += len(data)
    if how == "garbage":
        os.write(1, b"\\xff" * 100)
    else:
        os.write(1, bytes([40]) + bytes(8))  # a DATA frame's header, cut short
    os.close(1)
    remote.wait()
    """
)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
async def test_bad_input_from_the_remote_side_is_a_clear_error(
    ssh_target: SshTarget, tmp_path: Path, how: str
) -> None:
    script = tmp_path / "corrupt.py"
    script.write_text(_CORRUPT)
    # The remote Python's first line, then the template's READY in a DATA frame.
    version = subprocess.run(  # noqa: ASYNC221 (a moment, before the connection)
        [REMOTE_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        check=True,
    ).stdout.strip()
    first_line = len(b"\n" + _MARKER + version + b"\n")
    ready = 2 * _wire.HEADER.size + _wire.IDENTITY.size
    command = [sys.executable, str(script), str(first_line + ready), how]
    with pytest.raises(trio_fork.BrokenTemplateError) as info:
        async with open_remote_template(
            [*command, *ssh_target.command], python=REMOTE_PYTHON
        ) as template:
            async with template.spawn("tests.targets:sleep_forever"):
                await anyio.sleep_forever()
    expected = "broke the protocol" if how == "garbage" else "cut short"
    assert expected in str(info.value)


def test_the_relay_ends_everything_on_bad_input() -> None:
    from trio_fork._process import BOOTSTRAP, worker_sources
    from trio_fork._remote import _STAGE1

    boot = BOOTSTRAP.encode()
    setup = b"".join(
        _relay_frame(_relay.SETUP, {"env": None, "cwd": None, "imports": True, "timeout": 30.0})
    )
    with subprocess.Popen(
        [sys.executable, "-c", _STAGE1, "sources", "relay:0:1", "0", "0", "/"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as relay:
        assert relay.stdin is not None
        relay.stdin.write(b"%08d" % len(boot) + boot + worker_sources() + setup)
        relay.stdin.write(_wire.HEADER.pack(99, 0, 0, 0))  # garbage: an unknown frame
        relay.stdin.flush()
        relay.wait(timeout=10)  # its stdin still open
        assert relay.stderr is not None
        stderr = relay.stderr.read()
        relay.stdin.close()
    assert b"trio_fork relay: unknown frame 99" in stderr
    assert relay.returncode == 0


def _relay_frame(op: int, settings: dict[str, Any]) -> list[bytes]:
    import marshal

    from trio_fork.worker import _wire

    return _wire.encode(op, 0, marshal.dumps(settings))[0][0]  # type: ignore[return-value]


_LOCAL_PROCESS = textwrap.dedent(
    """
    import os, sys, anyio
    sys.path.insert(0, {root!r})
    from trio_fork._remote import open_remote_template

    async def main():
        async with open_remote_template({command!r}, python={python!r}) as template:
            async with template.spawn("tests.targets:wait_for_eof") as child:
                async with template.fork() as forked:
                    async with forked.spawn("tests.targets:wait_for_eof") as grandchild:
                        print(template.pid, child.pid, forked.pid, grandchild.pid, flush=True)
                        await anyio.to_thread.run_sync(sys.stdin.readline)
                        if {how!r} == "cancel":
                            with anyio.CancelScope() as scope:
                                scope.cancel()
                                await anyio.sleep_forever()
                            return
                        if {how!r} == "leave":
                            return
                        await anyio.sleep_forever()

    anyio.run(main, backend={backend!r})
    """
)


@pytest.mark.parametrize("how", ["leave", "cancel", "sigkill"])
def test_the_end_of_the_local_process_ends_every_remote_one(
    ssh_target: SshTarget, sshd_server: SshServer, anyio_backend: str, how: str
) -> None:
    script = _LOCAL_PROCESS.format(
        root=str(_ROOT),
        command=ssh_target.command,
        python=REMOTE_PYTHON,
        how=how,
        backend=anyio_backend,
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as local:
        assert local.stdin is not None
        assert local.stdout is not None
        remote_pids = [int(pid) for pid in local.stdout.readline().split()]
        assert len(remote_pids) == 4
        assert all(pid in sshd_server.sessions() for pid in remote_pids)
        if how == "sigkill":
            local.kill()
        else:
            local.stdin.write(b"go\n")
            local.stdin.flush()
        ended = time.monotonic()
        local.wait(timeout=30)
    assert dead_within([*remote_pids, *sshd_server.sessions()], 5), sshd_server.sessions()
    assert time.monotonic() - ended < 5 + 0.5


async def test_a_cut_link_is_noticed_on_both_sides(netns_hosts: list[NetnsHost]) -> None:
    host = netns_hosts[0]
    timeout = 2.0
    with pytest.raises(trio_fork.BrokenTemplateError, match=r"link .* was lost") as info:
        async with remote(host.target, link_timeout=timeout) as template:
            async with template.spawn("tests.targets:sleep_forever") as child:
                remote_pids = [template.pid, child.pid]
                assert all(process_alive(pid) for pid in remote_pids)
                host.cut("drop")
                cut = time.monotonic()
                try:
                    await child.wait()
                finally:
                    noticed = time.monotonic() - cut
    assert noticed < timeout * 2, noticed
    del info
    # The far side noticed too, with no FIN, no RST: it killed what it started.
    assert dead_within(remote_pids, timeout * 2)
    host.restore()


async def test_a_pool_spans_local_and_remote_templates(
    ssh_target: SshTarget, sshd_server: SshServer
) -> None:
    async with remote(ssh_target) as far, trio_fork.open_template() as near:
        async with trio_fork.open_pool(
            [(near, 2), (far, 3)], "tests.rpc_functions:sleep_then_return", idle=5
        ) as pool:
            assert pool.statistics().workers == 5
            # Each template got its own max, and no more.
            assert pool._placements.counts == [2, 3]
            async with anyio.create_task_group() as task_group:
                for index in range(20):
                    task_group.start_soon(pool.call, 0.01, index)
            assert pool._placements.counts == [2, 3]
        with pytest.raises(ValueError, match="given twice"):
            async with trio_fork.open_pool([near, near], "tests.rpc_functions:add"):
                pass
        with pytest.raises(TypeError, match="non-empty sequence"):
            async with trio_fork.open_pool([], "tests.rpc_functions:add"):
                pass
        with pytest.raises(ValueError, match="must be an int >= 1"):
            async with trio_fork.open_pool([(near, 0)], "tests.rpc_functions:add"):
                pass


def _other_python() -> str | None:
    """A CPython 3.11 or later of another version than this one, if the machine has one."""
    import glob
    import shutil

    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for version in ("3.12", "3.13", "3.11", "3.14"):
        if version == mine:
            continue
        pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3")
        for found in [*sorted(glob.glob(pattern)), shutil.which(f"python{version}")]:
            # A pyenv shim of a version not selected is on the PATH, and fails.
            if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
                return found
    return None


async def test_the_remote_python_may_be_another_version(ssh_target: SshTarget) -> None:
    python = _other_python()
    if python is None:
        pytest.skip("no CPython 3.11 or later of another version on this machine")
    async with open_remote_template(ssh_target.command, python=python) as template:
        await template.eval(
            "import sys\ndef version(sock):\n    sock.sendall(repr(sys.version_info[:2]).encode())"
        )
        async with template.spawn("__main__:version") as child:
            assert eval(await read_all(child.stream)) != sys.version_info[:2]
        async with trio_fork.open_rpc(template, "tests.rpc_functions:add") as rpc:
            assert await rpc.call([1], [2]) == [1, 2]
