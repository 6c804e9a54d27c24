"""Template.run_process and open_process: programs exec'd from a template."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import trio_fork
from tests.helpers import ours, process_exists

pytestmark = pytest.mark.anyio

# A program that reports its own state: descriptors, signals, session, umask, parent.
REPORT = """
import json, os, sys
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[name] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass
umask = os.umask(0)
print(json.dumps({
    "fds": {int(fd): target for fd, target in fds.items() if not target.endswith("/fd")},
    "session": os.getsid(0) == os.getpid(),
    "umask": umask,
    "ppid": os.getppid(),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
}))
"""
PYTHON = [sys.executable, "-I", "-S", "-c"]


@pytest.fixture
async def template() -> AsyncIterator[trio_fork.Template]:
    async with trio_fork.open_template() as template:
        yield template


async def report(template: trio_fork.Template, **options: object) -> dict[str, object]:
    result = await template.run_process([*PYTHON, REPORT], **options)  # type: ignore[arg-type]
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


async def test_results_as_anyio_gives_them(template: trio_fork.Template) -> None:
    result = await template.run_process(["echo", "hello"])
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.args, result.returncode, result.stdout, result.stderr) == (
        ["echo", "hello"],
        0,
        b"hello\n",
        b"",
    )
    command = "echo out; echo err >&2; exit 3"
    with pytest.raises(subprocess.CalledProcessError) as info:
        await template.run_process(command)
    assert (info.value.cmd, info.value.returncode) == (command, 3)
    assert (info.value.stdout, info.value.stderr) == (b"out\n", b"err\n")
    result = await template.run_process(command, check=False, stdout=subprocess.DEVNULL)
    assert (result.returncode, result.stdout, result.stderr) == (3, None, b"err\n")
    result = await template.run_process(["cat"], input=b"x" * 1_000_000)
    assert result.stdout == b"x" * 1_000_000
    result = await template.run_process("kill -USR1 $$", check=False)
    assert result.returncode == -signal.SIGUSR1
    assert set(ours()) == {template.pid}


async def test_the_program_gets_default_signals_and_an_empty_mask(
    template: trio_fork.Template,
) -> None:
    # Whatever the template does with signals (it ignores SIGINT itself).
    await template.eval(
        "import signal\n"
        "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGHUP})"
    )
    # Not a Python program: Python ignores SIGPIPE and SIGXFSZ itself.
    result = await template.run_process(["grep", "^Sig", "/proc/self/status"])
    status = dict(line.split(b":\t") for line in result.stdout.splitlines())
    # Of the signals a program may set: glibc keeps 32 and 33 for itself, and one
    # ignored where this test runs stays ignored, as with subprocess.
    settable = sum(1 << (sig - 1) for sig in signal.valid_signals())
    assert int(status[b"SigIgn"], 16) & settable == 0
    assert int(status[b"SigBlk"], 16) == 0
    # SIGPIPE at its default: the writer of a closed pipe dies quietly.
    result = await template.run_process("yes | head -n 2")
    assert (result.stdout, result.stderr) == (b"y\ny\n", b"")


async def test_only_the_descriptors_asked_for(template: trio_fork.Template, tmp_path: Path) -> None:
    # What the template holds (an inheritable file of its own, a queued descriptor)
    # never reaches the program.
    await template.eval(f"import os; KEPT = os.open({str(tmp_path)!r}, os.O_RDONLY)")
    await template.eval("import os; os.set_inheritable(KEPT, True)")
    read_end, write_end = os.pipe()
    try:
        await template.send_fds(read_end)
        state = await report(template, pass_fds=[write_end], stderr=subprocess.DEVNULL)
        assert sorted(map(int, state["fds"])) == [0, 1, 2, write_end]  # type: ignore[call-overload]
        assert state["fds"][str(write_end)] == os.readlink(f"/proc/self/fd/{write_end}")  # type: ignore[index]
        program = f"import os; os.write({write_end}, b'through the pipe')"
        await template.run_process([*PYTHON, program], pass_fds=[write_end])
        assert os.read(read_end, 100) == b"through the pipe"
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_standard_streams(template: trio_fork.Template, tmp_path: Path) -> None:
    path = tmp_path / "out"
    with open(path, "wb") as file:
        await template.run_process(
            "echo to a file; echo err >&2", stdout=file, stderr=subprocess.STDOUT
        )
    assert path.read_bytes() == b"to a file\nerr\n"
    with open(path, "rb") as file:
        result = await template.run_process(["cat"], stdin=file.fileno())
    assert result.stdout == b"to a file\nerr\n"
    result = await template.run_process(["cat"], stdin=subprocess.DEVNULL)
    assert result.stdout == b""
    # None: this process's own descriptors, not the template's.
    state = await report(template, stdin=None, stderr=None)
    fds: dict[str, str] = state["fds"]  # type: ignore[assignment]
    assert fds["0"] == os.readlink("/proc/self/fd/0")
    assert fds["2"] == os.readlink("/proc/self/fd/2")


async def test_environment_and_directory(
    template: trio_fork.Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # By default this process's, as they are now (not the template's).
    monkeypatch.setenv("TRIO_FORK_EXEC_TEST", "caller")
    monkeypatch.chdir(tmp_path)
    state = await report(template)
    assert state["env"] == dict(os.environ)
    assert state["cwd"] == str(tmp_path)
    state = await report(template, env={"ONLY": "this"}, cwd="/")
    environ: dict[str, str] = state["env"]  # type: ignore[assignment]
    environ.pop("LC_CTYPE", None)  # Python's own, in a C locale (PEP 538)
    assert environ == {"ONLY": "this"}
    assert state["cwd"] == "/"
    # A program without a slash is looked up in the PATH of the program's environment.
    program = tmp_path / "my-program"
    program.write_text("#!/bin/sh\necho found $ONLY\n")
    program.chmod(0o755)
    result = await template.run_process(["my-program"], env={"PATH": str(tmp_path), "ONLY": "it"})
    assert result.stdout == b"found it\n"
    with pytest.raises(FileNotFoundError):
        await template.run_process(["my-program"], env={"PATH": "/nonexistent"})


async def test_session_and_umask(template: trio_fork.Template) -> None:
    state = await report(template, start_new_session=True, umask=0o027)
    assert state["session"] is True
    assert state["umask"] == 0o027
    state = await report(template)
    assert state["session"] is False
    assert state["ppid"] == template.pid  # the template's child, not ours


async def test_the_real_exec_error_is_raised(template: trio_fork.Template, tmp_path: Path) -> None:
    not_executable = tmp_path / "data"
    not_executable.write_text("not a program")
    not_executable.chmod(stat.S_IRUSR | stat.S_IWUSR)
    cases: list[tuple[list[str], dict[str, object], type[OSError], str]] = [
        (["/nonexistent/program"], {}, FileNotFoundError, "/nonexistent/program"),
        (["no-such-program-anywhere"], {}, FileNotFoundError, "no-such-program-anywhere"),
        ([str(not_executable)], {}, PermissionError, str(not_executable)),
        ([str(tmp_path)], {}, PermissionError, str(tmp_path)),
        (["true"], {"cwd": tmp_path / "missing"}, FileNotFoundError, str(tmp_path / "missing")),
        (["true"], {"cwd": not_executable}, NotADirectoryError, str(not_executable)),
    ]
    for command, options, error, filename in cases:
        with pytest.raises(error) as info:
            await template.run_process(command, **options)  # type: ignore[arg-type]
        assert info.value.filename == filename
        with pytest.raises(error):
            await template.open_process(command, **options)  # type: ignore[arg-type]
        assert set(ours()) == {template.pid}
    # The template carries on.
    assert (await template.run_process(["true"])).returncode == 0


async def test_open_process_is_an_anyio_process(template: trio_fork.Template) -> None:
    async with await template.open_process(["cat"]) as process:
        assert isinstance(process, anyio.abc.Process)
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.returncode is None
        with open(f"/proc/{process.pid}/comm") as file:
            assert file.read() == "cat\n"
        await process.stdin.send(b"ping")
        assert await process.stdout.receive() == b"ping"
        await process.stdin.aclose()
        with pytest.raises(anyio.EndOfStream):
            await process.stdout.receive()
    assert process.returncode == 0
    for end in ("terminate", "kill", "send_signal"):
        async with await template.open_process(["sleep", "60"], stdout=None) as process:
            if end == "send_signal":
                process.send_signal(signal.SIGUSR1)
            else:
                getattr(process, end)()
            assert (
                await process.wait()
                == {
                    "terminate": -signal.SIGTERM,
                    "kill": -signal.SIGKILL,
                    "send_signal": -signal.SIGUSR1,
                }[end]
            )
        process.kill()  # once it has exited: nothing happens


async def test_cancellation_kills(template: trio_fork.Template) -> None:
    with anyio.move_on_after(0.2):
        await template.run_process(["sleep", "60"])
    with anyio.move_on_after(0.2):
        async with await template.open_process(["sleep", "60"]) as process:
            await process.wait()
    assert process.returncode == -signal.SIGKILL
    assert set(ours()) == {template.pid}


async def test_deliver_cancel(template: trio_fork.Template) -> None:
    delivered: list[trio_fork.TemplateProcess] = []

    async def deliver_cancel(process: trio_fork.TemplateProcess) -> None:
        delivered.append(process)
        process.terminate()

    program = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "time.sleep(60)"
    )
    with anyio.move_on_after(0.5):
        await template.run_process([*PYTHON, program], deliver_cancel=deliver_cancel)
    assert len(delivered) == 1
    assert delivered[0].returncode in (7, -signal.SIGTERM)
    assert set(ours()) == {template.pid}


async def test_the_program_dies_with_its_template() -> None:
    async with trio_fork.open_template() as template:
        process = await template.open_process(["sleep", "60"])
        os.kill(template.pid, signal.SIGKILL)
        with pytest.raises(trio_fork.BrokenTemplateError):
            await process.wait()
        # Its exit status died with the template; closing it waits until it is dead.
        with pytest.raises(trio_fork.BrokenTemplateError):
            await process.aclose()
        assert process.returncode is None
    with anyio.fail_after(5):
        while process_exists(process.pid):  # noqa: ASYNC110 (another process's state)
            await anyio.sleep(0.01)


async def test_this_process_never_forks(template: trio_fork.Template) -> None:
    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))
    await template.run_process(["true"])
    async with await template.open_process(["true"]) as process:
        pass
    assert process.returncode == 0
    assert forks == []


async def test_export_waits_for_open_processes(template: trio_fork.Template) -> None:
    async with await template.open_process(["sleep", "60"], stdout=None, stdin=None) as process:
        with pytest.raises(RuntimeError, match="block"):
            await template.export()
        process.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
async def test_user_and_groups(template: trio_fork.Template) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    result = await template.run_process(["id", "-u"], user="nobody")
    assert int(result.stdout) == nobody.pw_uid
    result = await template.run_process(["id", "-g"], group=nobody.pw_gid)
    assert int(result.stdout) == nobody.pw_gid
    result = await template.run_process(["id", "-G"], extra_groups=[nobody.pw_gid])
    assert int(result.stdout.split()[-1]) == nobody.pw_gid  # "id -G": the group too


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
async def test_another_user_starts_in_a_directory_it_could_not_enter(
    template: trio_fork.Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory is changed before the user, as subprocess does: "nobody" could not
    # enter a directory only root may, but starts in it (this process's, by default).
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.chdir(private)
    expected = (await anyio.run_process(["pwd"], user="nobody")).stdout  # subprocess's
    assert expected == f"{private}\n".encode()
    assert (await template.run_process(["pwd"], user="nobody")).stdout == expected
    monkeypatch.chdir("/")
    assert (await template.run_process(["pwd"], user="nobody", cwd=private)).stdout == expected


def test_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        trio_fork.TemplateProcess()  # type: ignore[call-arg]


async def test_bad_input(template: trio_fork.Template) -> None:
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"command": []}, ValueError, "empty"),
        ({"command": ["echo", "a\0b"]}, ValueError, "null byte"),
        ({"command": [1]}, TypeError, "command"),
        ({"command": ["true"], "startupinfo": object()}, ValueError, "Windows"),
        ({"command": ["true"], "stdin": 0, "input": b"x"}, ValueError, "only one"),
        ({"command": ["true"], "stdout": subprocess.STDOUT}, ValueError, "only for stderr"),
        ({"command": ["true"], "pass_fds": 3}, TypeError, "sequence"),
        ({"command": ["true"], "pass_fds": ["3"]}, TypeError, "not a file descriptor"),
        ({"command": ["true"], "stdin": "file"}, TypeError, "stdin"),
        ({"command": ["true"], "env": {"A=B": "c"}}, ValueError, "env"),
        ({"command": ["true"], "env": {"A": 1}}, TypeError, "env"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            await template.run_process(**options)  # type: ignore[arg-type]
    assert set(ours()) == {template.pid}
