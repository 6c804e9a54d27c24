"""fork_main_template: the running program, forked into a template (AnyEvent::Fork::Template)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import trio_fork
from tests.helpers import dead_within, process_alive, process_exists


@pytest.mark.anyio
async def test_refused_while_an_event_loop_runs(anyio_backend: str) -> None:
    with pytest.raises(RuntimeError, match=f"before any event loop starts, but {anyio_backend}"):
        trio_fork.fork_main_template()


def test_refused_while_other_threads_run() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="a-thread-with-a-distinct-name")
    thread.start()
    try:
        with pytest.raises(RuntimeError, match=r"other thread.*a-thread-with-a-distinct-name"):
            trio_fork.fork_main_template()
    finally:
        stop.set()
        thread.join()


PROGRAM = textwrap.dedent(
    """
    import atexit, json, os, sys, time

    import anyio, trio, trio_fork

    SENTINEL = "original"

    def parent_of(pid):
        with open(f"/proc/{pid}/stat") as file:
            return int(file.read().rsplit(")", 1)[1].split()[1])

    def worker(sock, label):
        report = {
            "label": label,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "sentinel": SENTINEL,
            "stdin": os.readlink("/proc/self/fd/0"),
            "imported": "json" in sys.modules and "trio" in sys.modules,
        }
        sock.sendall(json.dumps(report).encode())

    def sleep_forever(sock):
        sock.sendall(str(os.getpid()).encode())
        while True:
            time.sleep(60)

    def check_at_exit():
        # Registered before trio_fork's handler, so it runs after it.
        print("alive after exit:", os.path.exists(f"/proc/{HANDLE.pid}"), flush=True)

    atexit.register(check_at_exit)
    HANDLE = trio_fork.fork_main_template()
    print("handle", HANDLE.pid, parent_of(HANDLE.pid) == os.getpid(), flush=True)

    async def main(label):
        async with HANDLE.open() as template:
            assert parent_of(template.pid) == HANDLE.pid
            for step in ("before", "after"):
                async with template.spawn("__main__:worker", label) as child:
                    report = json.loads(await child.stream.receive())
                report["template"] = template.pid
                print("worker", step, json.dumps(report), flush=True)
                # Changes the opened template only: the next run starts afresh.
                await template.eval("SENTINEL = 'changed'")

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


def test_a_program_forks_itself_and_uses_it_in_runs_of_both_backends(tmp_path: Path) -> None:
    with run_program(tmp_path) as program:
        out, _ = program.communicate(timeout=60)
    assert program.returncode == 0, out
    lines = out.splitlines()
    assert lines[0].split()[2] == "True"  # the handle's template is the program's child
    handle_pid = int(lines[0].split()[1])
    reports = [(line.split()[1], json.loads(line.split(maxsplit=2)[2])) for line in lines[1:-1]]
    assert [(step, report["label"]) for step, report in reports] == [
        (step, label) for label in ("trio", "asyncio", "trio-again") for step in ("before", "after")
    ]
    templates = {report["template"] for _, report in reports}
    assert len(templates) == 3
    assert handle_pid not in templates
    for step, report in reports:
        assert report["ppid"] == report["template"]
        assert report["stdin"] == "/dev/null"
        # A worker is a copy of the program: its functions, globals and imports.
        assert report["imported"] is True
        assert report["sentinel"] == ("original" if step == "before" else "changed")
    # The handle ended with the interpreter, before the program's own exit code ran.
    assert lines[-1] == "alive after exit: False"
    assert not process_exists(handle_pid)
    assert not any(process_exists(pid) for pid in templates)


def test_everything_ends_when_the_program_is_killed(tmp_path: Path) -> None:
    with run_program(tmp_path, "hang") as program:
        assert program.stdout is not None
        handle_pid = int(program.stdout.readline().split()[1])
        for _ in range(6):
            program.stdout.readline()
        _, template, child = program.stdout.readline().split()
        pids = [handle_pid, int(template), int(child)]
        assert all(process_alive(pid) for pid in pids)
        program.send_signal(signal.SIGKILL)
        program.wait()
    assert dead_within(pids, 10)
