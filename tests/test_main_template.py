"""fork_main_template: the running program, forked into a template (AnyEvent::Fork::Template)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest
import trio

import trio_fork
from tests import targets
from tests.helpers import process_alive, process_exists, receive


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


def test_this_process_as_a_template_in_runs_of_both_backends() -> None:
    # Something only this process has, to show that workers get a copy of it.
    targets.SENTINEL = os.urandom(8).hex()  # type: ignore[attr-defined]
    try:
        with trio_fork.fork_main_template() as handle:
            assert parent_of(handle.pid) == os.getpid()

            async def main() -> tuple[int, dict[str, object], object]:
                async with handle.open() as template:
                    assert parent_of(template.pid) == handle.pid
                    env = await _report(template)
                    await template.eval("import tests.targets as t; t.SENTINEL = 'changed'")
                    async with template.spawn(_report_sentinel) as child:
                        changed = await receive(child.stream)
                    return template.pid, env, changed

            results = [trio.run(main), anyio.run(main, backend="asyncio"), trio.run(main)]
        assert not process_exists(handle.pid)
    finally:
        del targets.SENTINEL  # type: ignore[attr-defined]
    pids = {pid for pid, _, _ in results}
    assert len(pids) == 3
    for pid, env, changed in results:
        assert env["ppid"] == pid
        assert env["stdin"] == "/dev/null"
        # Everything this program had imported when it forked, pytest included.
        assert {"pytest", "trio", "tests.test_main_template"} <= set(env["modules"])  # type: ignore[call-overload]
        # Each run forks the handle's template afresh: one run's changes are gone.
        assert env["sentinel"] != "changed"
        assert changed == "changed"


async def _report(template: trio_fork.Template) -> dict[str, object]:
    async with template.spawn(_report_everything) as child:
        result: dict[str, object] = await receive(child.stream)
    return result


def _report_everything(sock: object) -> None:
    import socket

    assert isinstance(sock, socket.socket)
    targets.send(
        sock,
        {
            "ppid": os.getppid(),
            "stdin": os.readlink("/proc/self/fd/0"),
            "modules": sorted(sys.modules),
            "sentinel": getattr(targets, "SENTINEL", None),
        },
    )


def _report_sentinel(sock: object) -> None:
    import socket

    assert isinstance(sock, socket.socket)
    targets.send(sock, getattr(targets, "SENTINEL", None))


@pytest.mark.anyio
async def test_refused_while_an_event_loop_runs(anyio_backend: str) -> None:
    with pytest.raises(RuntimeError, match=f"before any event loop starts, but {anyio_backend}"):
        trio_fork.fork_main_template()


def test_refused_while_other_threads_run() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="a-thread-with-a-distinct-name")
    thread.start()
    try:
        with pytest.raises(RuntimeError, match=r"1 other thread.*a-thread-with-a-distinct-name"):
            trio_fork.fork_main_template()
    finally:
        stop.set()
        thread.join()


PROGRAM = textwrap.dedent(
    """
    import atexit, os, sys, time

    import anyio, trio, trio_fork

    def worker(sock, label):
        sock.sendall(f"{label} {os.getpid()}".encode())

    def sleep_forever(sock):
        sock.sendall(str(os.getpid()).encode())
        while True:
            time.sleep(60)

    def check_at_exit():
        # Registered before trio_fork's handler, so it runs after it.
        print("alive after exit:", os.path.exists(f"/proc/{HANDLE.pid}"), flush=True)

    atexit.register(check_at_exit)
    HANDLE = trio_fork.fork_main_template()
    print("handle", HANDLE.pid, flush=True)

    async def main(label):
        async with HANDLE.open() as template:
            async with template.spawn("__main__:worker", label) as child:
                print("worker", (await child.stream.receive()).decode(), flush=True)

    trio.run(main, "trio")
    anyio.run(main, "asyncio", backend="asyncio")
    trio.run(main, "trio-again")

    async def hang():
        async with HANDLE.open() as template:
            async with template.spawn("__main__:sleep_forever") as child:
                pid = (await child.stream.receive()).decode()
                print("hanging", template.pid, pid, flush=True)
                await trio.sleep_forever()

    if sys.argv[1:] == ["hang"]:
        trio.run(hang)
    """
)


def run_program(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_program_uses_its_own_functions_and_ends_the_template_at_exit(tmp_path: Path) -> None:
    with run_program(tmp_path) as program:
        out, _ = program.communicate(timeout=60)
    assert program.returncode == 0, out
    lines = out.splitlines()
    handle_pid = int(lines[0].split()[1])
    workers = [line.split() for line in lines if line.startswith("worker")]
    assert [label for _, label, _ in workers] == ["trio", "asyncio", "trio-again"]
    assert lines[-1] == "alive after exit: False"
    assert not process_exists(handle_pid)
    assert not any(process_exists(int(pid)) for _, _, pid in workers)


def test_everything_ends_when_the_program_is_killed(tmp_path: Path) -> None:
    with run_program(tmp_path, "hang") as program:
        assert program.stdout is not None
        handle_pid = int(program.stdout.readline().split()[1])
        for _ in range(3):
            program.stdout.readline()
        _, template, child = program.stdout.readline().split()
        pids = [handle_pid, int(template), int(child)]
        assert all(process_alive(pid) for pid in pids)
        program.send_signal(signal.SIGKILL)
        program.wait()
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(process_alive(pid) for pid in pids)
