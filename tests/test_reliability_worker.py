"""What templates guarantee about the processes below them (see docs/reliability.md,
"Descriptors, processes and signals"): process groups, death signals, reaping, threads."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import trio_fork
import trio_fork._template
from tests import targets
from tests.helpers import libffi, process_exists, receive, until, wait_until_dead
from tests.scripts.deep_tree import PARENT_OF

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36

# Run in templates, with PARENT_OF: a child that forks a grandchild and exits at once,
# leaving it an orphan below the template, in the template's process group or (with
# setsid) out of it.
LEAVE_BEHIND = """
def leave_behind(sock, setsid=False):
    pid = os.fork()
    if pid == 0:
        if setsid:
            os.setsid()
        while True:
            time.sleep(3600)
    send(sock, pid)
"""


def _children() -> set[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as file:
        return {int(pid) for pid in file.read().split()}


@pytest.fixture
def adopting() -> Iterator[None]:
    """This process as a child subreaper while the test runs: an init that reaps.

    What a killed template orphans comes here rather than to this machine's init (which
    may never reap it), and is reaped (killed first, if the test failed) afterwards.
    """
    from trio_fork import _open

    libc = ctypes.CDLL(None, use_errno=True)
    before = _children()
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        default = _open._default.handle  # a child of ours, not adopted
        for pid in _children() - before - {default.pid if default else 0}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# Process groups (issue 11, item 8) ---------------------------------------------------


async def test_every_template_leads_a_process_group_with_its_children() -> None:
    async with (
        trio_fork.open_template(preload=["tests.targets"]) as template,
        template.fork() as forked,
        template.spawn(targets.wait_for_eof) as child,
        forked.spawn(targets.wait_for_eof) as forked_child,
    ):
        assert os.getpgid(template.pid) == template.pid
        assert os.getpgid(child.pid) == template.pid
        assert os.getpgid(forked.pid) == forked.pid
        assert os.getpgid(forked_child.pid) == forked.pid


@pytest.mark.usefixtures("adopting")
@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
async def test_what_a_child_forked_dies_with_its_killed_template(fresh: bool) -> None:
    # Forked from the default template, its orphans would go to that template; a fresh
    # interpreter's, to init (here, to this process).
    async with trio_fork.open_template(preload=["tests.targets"], fresh=fresh) as template:
        await template.eval(PARENT_OF)
        with pytest.raises(trio_fork.BrokenTemplateError):
            async with template.spawn("__main__:parent_of") as child:
                _, grandchild = await receive(child.stream)
                os.kill(template.pid, signal.SIGKILL)
                with anyio.fail_after(10), pytest.raises(trio_fork.BrokenTemplateError):
                    await child.wait()
        await wait_until_dead(grandchild)


@pytest.mark.usefixtures("adopting")
async def test_what_a_child_forked_dies_with_its_killed_forked_template() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        with pytest.raises(trio_fork.BrokenTemplateError):
            async with template.fork() as forked:
                await forked.eval(PARENT_OF)
                async with forked.spawn("__main__:parent_of") as child:
                    _, grandchild = await receive(child.stream)
                    os.kill(forked.pid, signal.SIGKILL)
                    with anyio.fail_after(10), pytest.raises(trio_fork.BrokenTemplateError):
                        await child.wait()
        await wait_until_dead(grandchild)
        # The template it was forked from carries on.
        async with template.spawn(targets.one_byte) as sibling:
            assert await sibling.stream.receive() == b"x"


def _blocks_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as file:
        blocked = next(line for line in file if line.startswith("SigBlk:")).split()[1]
    return bool(int(blocked, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.usefixtures("adopting")
async def test_what_a_template_orphaned_dies_when_it_is_killed_for_not_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Leaving the block sends SIGTERM, then SIGKILL after CLOSE_TIMEOUT (5 s, less here).
    monkeypatch.setattr(trio_fork._template, "CLOSE_TIMEOUT", 0.5)
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        await template.eval(PARENT_OF + LEAVE_BEHIND)
        async with template.spawn("__main__:leave_behind") as child:
            grandchild = await receive(child.stream)
        assert child.returncode == 0
        async with anyio.create_task_group() as task_group:
            # A command that neither end of file nor SIGTERM interrupts.
            code = "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); time.sleep(600)"
            task_group.start_soon(template.eval, f"import signal, time; {code}")
            await until(lambda: _blocks_sigterm(template.pid))
            task_group.cancel_scope.cancel()
    await wait_until_dead(grandchild)


async def test_what_left_the_group_dies_when_the_template_ends() -> None:
    # Out of reach of the group's guard, but adopted by the template: a clean end kills it.
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        await template.eval(PARENT_OF + LEAVE_BEHIND)
        async with template.spawn("__main__:leave_behind", True) as child:
            grandchild = await receive(child.stream)
        await until(lambda: os.getpgid(grandchild) == grandchild)
    assert not process_exists(grandchild)


# A stopped tree (issue 11, item 9) ---------------------------------------------------


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as file:
        stat = file.read()
    return stat[stat.rindex(")") + 2] in "Tt"


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_stopped_tree_goes_when_its_parent_is_killed(backend: str) -> None:
    # Ctrl-Z or SIGSTOP to everyone, then the parent killed: nobody can run a clean-up
    # until something wakes them. The subreaper stands in for an init that reaps.
    command = [sys.executable, "-m", "tests.scripts.subreaper"]
    command += [sys.executable, "-m", "tests.scripts.deep_tree", backend]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as wrapper:
        assert wrapper.stdout is not None
        tree = json.loads(wrapper.stdout.readline())
        below = [*tree["templates"], *tree["children"], *tree["grandchildren"]]
        try:
            for pid in [tree["parent"], *below]:
                os.kill(pid, signal.SIGSTOP)
            for pid in [tree["parent"], *below]:
                while not _stopped(pid):
                    time.sleep(0.001)
            os.kill(tree["parent"], signal.SIGKILL)
            # Returns once nothing is left below the subreaper: a hang if anything stays.
            wrapper.communicate(timeout=30)
        finally:
            for pid in below:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wrapper.kill()
    assert not [pid for pid in below if process_exists(pid)]


# Reaping (issue 11, item 11) ---------------------------------------------------------


async def test_the_template_leaves_its_codes_processes_to_that_code() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        await template.eval(
            "import os, subprocess, sys\n"
            "process = subprocess.Popen([sys.executable, '-c', 'raise SystemExit(3)'])\n"
            "os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)"
        )
        # A child's exit makes the template reap what has exited: not the process above.
        async with template.spawn(targets.nothing) as child:
            pass
        assert child.returncode == 0
        await template.eval("assert process.wait() == 3, process.returncode")


async def test_orphans_below_a_template_are_reaped() -> None:
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        await template.eval(PARENT_OF + LEAVE_BEHIND)
        async with template.spawn("__main__:leave_behind") as child:
            grandchild = await receive(child.stream)
        await until(lambda: _parent(grandchild) == template.pid)  # adopted
        os.kill(grandchild, signal.SIGKILL)
        await until(lambda: not process_exists(grandchild))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        stat = file.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


# Threads in a template (issue 17, item 2) --------------------------------------------

START_A_THREAD = (
    "import threading, time; threading.Thread(target=time.sleep, args=(600,), daemon=True).start()"
)


async def test_a_template_with_a_thread_is_reported_and_loses_no_child() -> None:
    # Python 3.15 raises its warning about forking with threads after the child exists
    # when warnings are errors: the template would lose track of its child.
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    async with trio_fork.open_template(preload=["tests.targets"], env=env) as template:
        with pytest.warns(RuntimeWarning, match=r"runs 1 other thread\(s\) after this command"):
            await template.eval(START_A_THREAD)
        await template.eval("x = 1")  # warned once, not at every command
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"
        assert child.returncode == 0
        async with template.fork() as forked, forked.spawn(targets.one_byte) as forked_child:
            assert await forked_child.stream.receive() == b"x"
        assert forked_child.returncode == 0


async def test_templates_fork_when_warnings_are_errors() -> None:
    # No thread here, but titles with spaces ("tmpl of 1234"): CPython 3.12+ reads the
    # thread count from /proc/self/stat split at spaces, and 3.15 raises its warning.
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    async with (
        trio_fork.open_template(preload=["tests.targets"], env=env) as template,
        template.fork() as forked,
        forked.spawn(targets.one_byte) as child,
    ):
        assert await child.stream.receive() == b"x"
    assert child.returncode == 0


def test_a_handle_whose_preload_starts_a_thread_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "starts_a_thread.py").write_text(START_A_THREAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="other thread"):
        handle = trio_fork.start_template(preload=["starts_a_thread"])
    handle.close()


# Descriptors (issue 17, item 1) ------------------------------------------------------


REPORT = """
import json, os, sys

def report(sock):
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) != sock.fileno() and os.path.exists(f"/proc/self/fd/{fd}"):
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    sock.sendall(json.dumps([fds, "ctypes" in sys.modules]).encode())
    sock.recv(1)  # alive until the parent has looked (leaving the block closes the stream)
"""


async def test_the_one_descriptor_a_child_may_hold_unasked_is_libffis() -> None:
    async with trio_fork.open_template() as template:
        await template.eval(REPORT)
        async with template.spawn("__main__:report") as child:
            fds, has_ctypes = json.loads(await child.stream.receive())
            fds = {int(fd): target for fd, target in fds.items()}
            assert set(fds) - libffi(fds) == {0, 1, 2}
            for fd in libffi(fds):
                # Opened by CPython's _ctypes from 3.14: read-only, and gone at any exec.
                with open(f"/proc/{child.pid}/fdinfo/{fd}") as file:
                    flags = int(
                        next(line for line in file if line.startswith("flags:")).split()[1], 8
                    )
                assert flags & os.O_ACCMODE == os.O_RDONLY
                assert flags & os.O_CLOEXEC
    # _ctypes alone: its import takes a sixth of the time ctypes takes.
    assert not has_ctypes
