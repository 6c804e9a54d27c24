"""Processes, seen from the parent: starting a template interpreter, and pidfds.

The one copy of: launching a template (and checking the first frame it sends), pidfd
signalling and polling, reaping our own children, the fork-safety check, and the
walk of a process's descendants.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping

import sniffio

from . import worker
from ._errors import BrokenTemplateError
from .worker import _wire

_WORKER_DIR = os.path.dirname(os.path.abspath(worker.__file__))
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(_WORKER_DIR))
PYTHON_VERSION = tuple(sys.version_info[:2])
CLOSE_TIMEOUT = 5.0
"""How long a process that was asked to end may take before it is killed."""


def _bootstrap() -> str:
    with open(os.path.join(_WORKER_DIR, "_boot.py")) as file:
        return file.read()


BOOTSTRAP = _bootstrap()


def worker_sources() -> bytes:
    """The worker side's sources, as a template started with ``sources`` reads them."""
    import marshal

    sources: dict[str, tuple[bool, str]] = {}
    package_init = os.path.join(os.path.dirname(_WORKER_DIR), "__init__.py")
    with open(package_init) as file:
        sources["trio_fork"] = (True, file.read())
    for name in sorted(os.listdir(_WORKER_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(_WORKER_DIR, name)) as file:
                module = "trio_fork.worker" + ("" if name == "__init__.py" else f".{name[:-3]}")
                sources[module] = (name == "__init__.py", file.read())
    data = marshal.dumps(sources)
    return len(data).to_bytes(8, "little") + data


def launch(
    executable: str,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    *,
    how: str = "import",
    isolated: bool = False,
) -> tuple[subprocess.Popen[bytes], int, socket.socket | tuple[int, int]]:
    """Start a template interpreter: the process, a pidfd, our end of its channel.

    ``how``: ``"import"`` the worker side from this trio_fork; ``"sources"``, send it
    down the channel, as to a host where trio_fork is not installed; ``"pipes"``, the
    same over the interpreter's stdin and stdout, a channel that carries no
    descriptors (then the channel is a pair: read end, write end). ``isolated`` runs
    the interpreter with ``-I -S`` and its own ``sys.path``: no site-packages.
    """
    pipes = how == "pipes"
    ours, theirs = socket.socketpair()
    path = [] if isolated else [os.path.abspath(p) for p in sys.path if isinstance(p, str)]
    channel = "pipes:0:1" if pipes else f"socket:{theirs.fileno()}"
    # The template inherits this signal mask: a Ctrl-C during its start-up stays
    # pending until it ignores SIGINT, instead of printing a traceback there.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sigint_blocked = "0" if signal.SIGINT in mask else "1"
    try:
        process = subprocess.Popen(
            [
                *(executable, *(["-I", "-S"] if isolated else []), "-c", BOOTSTRAP),
                *("import" if how == "import" else "sources", channel, str(os.getpid())),
                *(sigint_blocked, _PACKAGE_ROOT, *path),
            ],
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else None,
            pass_fds=() if pipes else (theirs.fileno(),),
            env=env,
            cwd=cwd,
        )
    except OSError as exc:
        ours.close()
        where = f" in {os.fspath(cwd)!r}" if cwd is not None else ""
        raise type(exc)(
            exc.errno, f"cannot start a template with python={executable!r}{where}: {exc.strerror}"
        ) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
    if pipes:
        ours.close()
        assert process.stdin is not None
        assert process.stdout is not None
        ends = (os.dup(process.stdout.fileno()), os.dup(process.stdin.fileno()))
        process.stdout.close()
        process.stdin.close()
    try:
        pidfd = os.pidfd_open(process.pid)
    except BaseException:
        _wire.close_all(list(ends) if pipes else [ours.detach()])
        process.kill()
        process.wait()
        raise
    if how != "import":
        data = memoryview(worker_sources())
        try:
            while data:
                data = data[os.write(ends[1] if pipes else ours.fileno(), data) :]
        except OSError:
            pass  # it died: its READY never comes, and the caller says so
    return process, pidfd, ends if pipes else ours


def check_ready(frame: _wire.Frame | None, what: str, exited: object = None) -> int:
    """The pid in a template's first frame (READY); or why it is not a template.

    Raises:
        BrokenTemplateError: No READY came, or the template runs another Python.
    """
    if frame is None or frame.op != _wire.READY or len(frame.payload) != _wire.IDENTITY.size:
        _wire.close_all(frame.fds if frame is not None else [])
        status = "" if exited is None else f" with status {exited}"
        raise BrokenTemplateError(
            f"the {what} exited{status} before it was ready (its stderr may say why)"
        )
    pid, major, minor = _wire.IDENTITY.unpack(frame.payload)
    if (major, minor) != PYTHON_VERSION:
        _wire.close_all(frame.fds)
        raise BrokenTemplateError(
            f"the {what} runs Python {major}.{minor} but this process runs "
            f"{'.'.join(map(str, PYTHON_VERSION))}: a template imports from this process's "
            "sys.path, so it must run the same Python version"
        )
    return int(pid)


def signal_pidfd(pidfd: int, sig: int) -> None:
    """Send ``sig`` through a pidfd; nothing if the process is gone."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def readable(fd: int, timeout: float = 0) -> bool:
    """Whether ``fd`` (a pidfd: the process has exited) turns readable in ``timeout``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def reap(pid: int, pidfd: int, process: subprocess.Popen[bytes] | None) -> int | None:
    """Wait for our child to exit and reap it; its exit status (None if not ours to know)."""
    try:
        if process is not None:
            return process.wait()
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return None  # someone else in this process reaped it (a waitpid(-1))
        return os.waitstatus_to_exitcode(status)
    finally:
        os.close(pidfd)


def check_fork_is_safe(what: str) -> None:
    """Raise unless this process may be forked: no event loop, no other thread."""
    library = _running_event_loop()
    if library is not None:
        raise RuntimeError(
            f"{what} must run before any event loop starts, but {library} is running "
            "here: a forked copy of a running event loop is unsafe to use"
        )
    others = len(os.listdir("/proc/self/task")) - 1
    if others:
        current = threading.current_thread()
        names = [thread.name for thread in threading.enumerate() if thread is not current]
        raise RuntimeError(
            f"{what} needs a single-threaded process, but {others} other thread(s) run "
            f"here ({', '.join(names) or 'none started by Python'}): a forked copy could "
            "inherit a lock that one of them holds, and hang"
        )


def _running_event_loop() -> str | None:
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        pass
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "asyncio"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from ``/proc``."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as file:
                    children = [int(child) for child in file.read().split()]
            except OSError:
                continue
            found.extend(children)
            frontier.extend(children)
    return found
