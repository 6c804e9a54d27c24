"""Targets that the tests run in children. Standard library only.

Messages to the parent are length-prefixed pickles (see :func:`send`); the parent
reads them with ``tests.helpers.receive``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import pickle
import signal
import socket
import struct
import sys
import time
from typing import Any

_LENGTH = struct.Struct("<I")


def send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def describe(arg: Any) -> Any:
    """What the parent can compare: descriptors become their file identity."""
    if isinstance(arg, int) and not isinstance(arg, bool) and arg > 2:
        try:
            return ("fd", fd_identity(arg))
        except OSError:
            pass
    return arg


def fd_identity_of_pipe(fd: int) -> tuple[int, int]:
    """A pipe end: its inode (shared by both ends) and access mode (which end)."""
    return os.fstat(fd).st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def report_args(sock: socket.socket, *args: Any) -> None:
    send(sock, [describe(arg) for arg in args])


def report_raw_args(sock: socket.socket, *args: Any) -> None:
    send(sock, args)


def echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def nothing(sock: socket.socket, *args: Any) -> None:
    pass


def one_byte(sock: socket.socket) -> None:
    sock.send(b"x")


def sleep_forever(sock: socket.socket, *args: Any) -> None:
    send(sock, os.getpid())
    while True:
        time.sleep(3600)


def exit_on_message(sock: socket.socket) -> None:
    send(sock, "ready")
    if sock.recv(16) == b"quit":
        raise SystemExit(0)
    raise SystemExit(3)


def wait_for_eof(sock: socket.socket) -> None:
    while sock.recv(4096):
        pass


def exit_with(sock: socket.socket, code: Any) -> None:
    raise SystemExit(code)


def os_exit(sock: socket.socket, code: int) -> None:
    os._exit(code)


def raise_value_error(sock: socket.socket, message: str) -> None:
    raise ValueError(message)


def exhaust_memory(sock: socket.socket) -> None:
    import resource

    limit = 512 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    blocks = []
    while True:
        blocks.append(bytearray(64 * 1024 * 1024))


def exit_at(sock: socket.socket, when: float, code: int) -> None:
    time.sleep(max(0.0, when - time.time()))
    os._exit(code)


def print_without_newline(sock: socket.socket, text: str) -> None:
    sys.stdout.write(text)
    sock.sendall(b"ok")


def report_cloexec(sock: socket.socket, *fds: int) -> None:
    def cloexec(fd: int) -> bool:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    send(sock, {"sock": cloexec(sock.fileno()), "fds": [cloexec(fd) for fd in fds]})


def report_fd_count(sock: socket.socket, *fds: int) -> None:
    send(sock, {"count": len(fds), "identities": sorted({fd_identity_of_pipe(fd) for fd in fds})})


def segfault(sock: socket.socket) -> None:
    ctypes.string_at(0)


def kill_self(sock: socket.socket, sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(10)


def print_and_exit(sock: socket.socket, out: str, err: str) -> None:
    print(out)
    print(err, file=sys.stderr)


def report_length(sock: socket.socket, data: bytes) -> None:
    send(sock, (len(data), data[:4], data[-4:]))


def open_fds() -> dict[int, str]:
    """This process's file descriptors: fd -> what it refers to.

    Here, in the standard-library-only targets, so that children and tests share it.
    """
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor that listdir used
    return fds


def report_environment(sock: socket.socket, *queued: Any) -> None:
    main = sys.modules["__main__"]
    send(
        sock,
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "modules": sorted(sys.modules),
            "main": {k: v for k, v in vars(main).items() if k.isupper()},
            "main_has_args": "args" in vars(main),
            "path": list(sys.path),
            "stdin": os.readlink("/proc/self/fd/0"),
            "fds": open_fds(),
            "sock": sock.fileno(),
            "blocking": sock.getblocking(),
        },
    )


def report_signals(sock: socket.socket) -> None:
    names = ["SIGINT", "SIGTERM", "SIGCHLD", "SIGPIPE", "SIGUSR1", "SIGHUP"]
    handlers = {}
    for name in names:
        handler = signal.getsignal(getattr(signal, name))
        handlers[name] = handler if handler in (signal.SIG_DFL, signal.SIG_IGN) else repr(handler)
    send(
        sock,
        {
            "handlers": handlers,
            "default_int": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
            "wakeup_fd": signal.set_wakeup_fd(-1),
            "mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        },
    )


def write_to_fds(sock: socket.socket, *fds: int) -> None:
    for index, fd in enumerate(fds):
        os.write(fd, f"written by child to fd #{index}".encode())
        os.close(fd)


def receive_fd_and_write(sock: socket.socket) -> None:
    message, fds, _, _ = socket.recv_fds(sock, 16, 4)
    for fd in fds:
        os.write(fd, message)
        os.close(fd)
    send(sock, len(fds))


def send_back_a_pipe(sock: socket.socket) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"through a pipe from the child")
    os.close(write_end)
    socket.send_fds(sock, [b"p"], [read_end])


def report_inherited_object(sock: socket.socket) -> None:
    main = sys.modules["__main__"]
    send(sock, getattr(main, "SENTINEL_PATH", None))


async def async_echo(stream: Any, *args: Any) -> None:
    import sniffio

    await stream.send(pickle.dumps((type(stream).__name__, sniffio.current_async_library(), args)))
    while True:
        try:
            data = await stream.receive()
        except Exception:
            return
        await stream.send(data)


async def async_fail(stream: Any) -> None:
    raise RuntimeError("async target failed")


def not_callable_target() -> None:
    pass


NOT_CALLABLE = 42


async def adopt_and_report(stream: Any) -> None:
    """Adopt the template whose channel arrives on ``stream``, spawn from it, report."""
    import trio_fork

    _, fds = await stream.receive_fds(1, 1)
    with socket.socket(fileno=fds[0]) as channel:
        async with trio_fork.adopt_template(channel) as template:
            async with template.spawn(report_raw_args, "from the adopter") as child:
                data = b"".join([chunk async for chunk in child.stream])
            reported = pickle.loads(data[_LENGTH.size :])
            await stream.send(pickle.dumps((template.pid, reported)))
            # Hold the template until the parent has looked at it.
            await stream.receive()


def journal_start_and_end_of_file(sock: socket.socket, path: str) -> None:
    """Journal ``start PID``, and ``eof PID`` if the parent closes its end; then sleep."""
    with open(path, "a") as file:
        file.write(f"start {os.getpid()}\n")
    if not sock.recv(1):
        with open(path, "a") as file:
            file.write(f"eof {os.getpid()}\n")
    while True:
        time.sleep(3600)
