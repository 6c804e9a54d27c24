"""``trio_fork serve``: a server's process, from its start to its stop.

The command runs one :class:`~trio_fork._zygote_server.Server` in the foreground:
it takes the lock that makes it the only server of its name, starts the first
template, listens, tells a ``run`` that started it how the start went, and stops on
SIGTERM, SIGINT (or SIGHUP), ``serve --stop``, or after ``--idle-timeout`` without a
run. Before all that it sets up the process: a session of its own (so that no
program it runs has a controlling terminal to be stopped by), and signal
dispositions that templates, and so programs, can start from.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from ._errors import BrokenTemplateError, RemoteError
from ._zygote_client import ZygoteError, base_path, socket_path
from ._zygote_generation import keep_generation
from ._zygote_server import Server, log
from .worker import _wire

_PYTHON_IGNORES = {signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP}


def _listen(path: str) -> socket.socket:
    if path.startswith("\0") or not os.path.isabs(path):
        raise ZygoteError(f"not a path for a socket: {path!r}")  # never an abstract socket
    try:
        os.unlink(path)  # left by a server that was killed: we hold the lock
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


def _report(ready_fd: int | None, text: str) -> None:
    """Tell the client that started us how the start went."""
    if ready_fd is not None:
        try:
            os.write(ready_fd, text.encode())
        except OSError:
            pass
        os.close(ready_fd)


async def _serve(preload: list[str], idle_timeout: float | None, ready_fd: int | None) -> int:
    catch_sighup = signal.getsignal(signal.SIGHUP) not in (signal.SIG_IGN, _ignore)
    try:
        path = socket_path(preload)
    except ZygoteError as exc:
        _report(ready_fd, f"{exc}\n")
        log(str(exc))
        return 1
    # Templates import from the path that the server's name stands for.
    sys.path[:] = base_path()
    lock = os.open(path[: -len(".sock")] + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _report(ready_fd, "running\n")
            log(f"a server for {path} runs already")
            return 0
        stopping = anyio.Event()
        async with anyio.create_task_group() as group:
            # From the start: a SIGTERM before the socket is up still ends us cleanly.
            await group.start(_watch_signals, stopping, catch_sighup)
            try:
                first = await group.start(keep_generation, 1, preload)
            except (RemoteError, BrokenTemplateError, OSError) as exc:
                message = str(exc)
                if isinstance(exc, RemoteError):
                    message = f"a preloaded module failed to import:\n{exc.remote_traceback}"
                _report(ready_fd, f"{message.rstrip()}\n")
                log(message)
                group.cancel_scope.cancel()
                return 1
            listener = _listen(path)
            server = Server(
                preload, path, group, listener, os.stat(path).st_ino, first, 1, stopping=stopping
            )
            server.unarmed.set()
            log(f"serving {sys.executable} with preload {preload} on {path}")
            _report(ready_fd, f"ready {os.getpid()}\n")
            group.start_soon(server.accept)
            group.start_soon(server.keep_armed)
            if idle_timeout is not None:
                group.start_soon(server.stop_when_idle, idle_timeout)
            try:
                await server.stopping.wait()
            finally:
                server.stop_listening(serve_queued=False)
                group.cancel_scope.cancel()
        listener.close()
        log("stopped")
        _wire.close_all(server.stop_waiters)
        return 0
    finally:
        os.close(lock)


async def _watch_signals(
    stopping: anyio.Event, catch_sighup: bool, *, task_status: TaskStatus[None]
) -> None:
    stops = [signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if catch_sighup else [])]
    with anyio.open_signal_receiver(*stops) as received:
        task_status.started()
        async for sig in received:
            log(f"stopping on {signal.Signals(sig).name}")
            stopping.set()


def _ignore(signum: int, frame: object) -> None:
    """A handler that does what SIG_IGN does, but that a new program does not inherit."""


def _unignore_signals() -> None:
    """Let templates start with the signal dispositions of a fresh program.

    A program inherits the signals ignored by whoever started it (``nohup`` ignores
    SIGHUP); the templates would, and so every program forked from them. Those the
    client ignores are ignored again in its program.
    """
    for sig in signal.valid_signals():
        if sig not in _PYTHON_IGNORES and signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _ignore)


_RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _own_session(ready_fd: int | None) -> int | None:
    """Run in a session of our own, without a controlling terminal; None in the server.

    Programs run in process groups of the server's session: were it a terminal's,
    a program reading that terminal from its background group would be stopped. A
    server started from a shell is a process group leader and cannot leave its
    session: this process forks, the child serves in a new session, and this one
    waits for it where it was started, passing on the signals that stop it (Ctrl-C).
    """
    if os.getsid(0) == os.getpid():
        return None
    _wire.flush_stdio()
    # Held from before the fork, and taken one at a time: a handler would run only
    # between two bytecodes, and one that came just before waitpid would wait for
    # the server's own end.
    relayed = {sig for sig in _RELAYED if signal.getsignal(sig) != signal.SIG_IGN}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, relayed | {signal.SIGCHLD})
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.setsid()
        return None
    if ready_fd is not None:
        os.close(ready_fd)  # the server's to write and close: its end of file is news
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        sig = signal.sigwaitinfo(relayed | {signal.SIGCHLD}).si_signo
        if sig != signal.SIGCHLD:
            os.kill(pid, sig)  # not reaped yet: it is still ours
    return os.waitstatus_to_exitcode(status)


def main(
    preload: Sequence[str], *, backend: str, idle_timeout: float | None, ready_fd: int | None
) -> int:
    """``serve``: run a server in the foreground until it is stopped; the exit status."""
    status = _own_session(ready_fd)
    if status is not None:
        return status if status >= 0 else 128 - status
    _unignore_signals()
    return anyio.run(_serve, list(preload), idle_timeout, ready_fd, backend=backend)
