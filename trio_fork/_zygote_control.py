"""The client's rare dealings with a ``trio_fork run`` server: starting one, status, stop.

A run pays for every module its client imports, so what a run seldom needs is here,
imported only when needed. The first ``trio_fork run`` for an interpreter and preload
list finds no server listening: it starts ``serve`` as a daemon (in a session of its
own, not its child, its log next to the socket) and waits until it says it is ready.
Clients that come at the same time take turns on a lock file, so that one server
starts and the others find it listening. ``serve --status`` and ``--stop`` ask a
running server over the same socket (:func:`control`).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from ._zygote_client import Answers, ZygoteError, connect, program_name, send_request

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Sequence


def start_server(path: str, preload: Sequence[str], verbose: bool) -> _socket.socket:
    """Start a server for ``path`` in the background, or wait for the one starting."""
    stem = path[: -len(".sock")]
    lock = os.open(stem + ".start", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # One client at a time starts a server; the others find it listening.
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = connect(path)
        if sock is not None:
            return sock
        try:
            answer = _launch(path, preload)
        except OSError as exc:
            raise ZygoteError(f"cannot start a server: {exc}") from None
        if answer.startswith("ready") and verbose:
            sys.stderr.write(
                f"{program_name()} run: started a server (pid {answer.split()[1]}) for "
                f"{sys.executable} with preload {list(preload)}: socket {path}, log "
                f"{stem}.log; it ends after an hour without runs, or with `serve --stop`\n"
            )
        elif not answer.startswith(("ready", "running")):
            raise ZygoteError(f"the server did not start:\n{answer.rstrip()}")
        return _connect_within(path, 60.0)
    finally:
        os.close(lock)


def _launch(path: str, preload: Sequence[str]) -> str:
    """Start ``serve`` in a session of its own, not our child; what it says when ready."""
    log_path = path[: -len(".sock")] + ".log"
    read, write = os.pipe()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    command = [sys.executable, "-m", "trio_fork", "serve", "--ready-fd", str(write)]
    command += ["--idle-timeout", "3600", *(f"--preload={name}" for name in preload)]
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:
                os.setsid()  # a session leader: the server needs no session of its own
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.set_inheritable(write, True)
                os.chdir("/")  # not to keep the user's directory busy
                os.execv(sys.executable, command)
        except BaseException as exc:
            os.write(2, f"cannot start {command}: {exc}\n".encode())
        finally:
            os._exit(127)
    os.close(write)
    os.close(log)
    os.waitpid(pid, 0)
    with open(read, "rb") as ready:
        answer = ready.read().decode("utf-8", "replace")
    return answer or f"it exited before it was ready (see {log_path})"


def _connect_within(path: str, seconds: float) -> _socket.socket:
    deadline = time.monotonic() + seconds
    while True:
        sock = connect(path)
        if sock is not None:
            return sock
        if time.monotonic() > deadline:
            raise ZygoteError(f"no server answers at {path!r}")
        time.sleep(0.01)


def control(path: str, command: str) -> str | None:
    """Ask the server at ``path`` for ``status`` or to ``stop``; None if none runs.

    ``stop`` returns once the server has exited.
    """
    sock = connect(path)
    if sock is None:
        return None
    try:
        send_request(sock, command.encode())
        answers = Answers(sock)
        text = ""
        while (message := answers.next()) is not None:
            kind, body = message
            if kind == b"E":
                raise ZygoteError(body.decode("utf-8", "replace"))
            text += body.decode("utf-8", "replace")
            if command != "stop":
                break
    finally:
        sock.close()
    return text
