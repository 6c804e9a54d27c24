"""Functions that RPC workers, pools and run_sync run in the tests. Standard library only.

Some record what happened in the worker in a journal: a file named by the test, one
line per entry, so that the test can tell what ran, and in which order, after the
fact (or while it runs).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

INITIALISED: list[Any] = []


def journal(path: str, entry: str) -> None:
    with open(path, "a") as file:
        file.write(f"{entry}\n")


def read_journal(path: str) -> list[str]:
    try:
        with open(path) as file:
            return file.read().splitlines()
    except FileNotFoundError:
        return []


def add(a: Any, b: Any) -> Any:
    return a + b


def echo(*args: Any) -> tuple[Any, ...]:
    return args


def identity(value: Any) -> Any:
    return value


def length(data: bytes) -> int:
    return len(data)


def make_bytes(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def getpid(*args: Any) -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


class UnpicklableError(Exception):
    def __init__(self, message: str, lock: Any) -> None:
        super().__init__(message)
        self.lock = lock


def fail_unpicklably(message: str) -> None:
    raise UnpicklableError(message, threading.Lock())


def return_unpicklable() -> Any:
    return threading.Lock()


def exit_now(code: int) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_then_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def record(path: str, entry: str, seconds: float = 0.0) -> str:
    """Journal ``start entry``, sleep, journal ``end entry``."""
    journal(path, f"start {entry}")
    time.sleep(seconds)
    journal(path, f"end {entry}")
    return entry


def wait_for_file(path: str, entry: str) -> str:
    """Journal that the call started, then wait until ``path + '.go'`` exists."""
    journal(path, f"start {entry}")
    while not os.path.exists(path + ".go"):
        time.sleep(0.005)
    journal(path, f"end {entry}")
    return entry


def meet(path: str, count: int) -> int:
    """Return only once ``count`` calls (in any processes) have come here; the pid."""
    journal(path, str(os.getpid()))
    while len(read_journal(path)) < count:
        time.sleep(0.005)
    return os.getpid()


def initialise(*args: Any) -> None:
    INITIALISED.append(args)


def initialised() -> list[Any]:
    return INITIALISED


def init_journal(path: str) -> None:
    journal(path, f"init {os.getpid()}")


def broken_init() -> None:
    raise RuntimeError("init failed on purpose")


def progress(emit: Any, count: int) -> str:
    for index in range(count):
        emit({"step": index})
    return "done"


def emit_late(emit: Any) -> Any:
    return emit


def modules_loaded(*names: str) -> list[bool]:
    return [name in sys.modules for name in names]


def retire_when_asked() -> bool:
    return os.path.exists(os.environ.get("TRIO_FORK_TEST_RETIRE", "/nonexistent"))


# Async functions: the worker runs them on the parent's event loop.

_arrived = 0
_all_arrived: Any = None


async def async_add(a: Any, b: Any) -> Any:
    import anyio.lowlevel

    await anyio.lowlevel.checkpoint()
    return a + b


async def async_fail(message: str) -> None:
    import anyio.lowlevel

    await anyio.lowlevel.checkpoint()
    raise KeyError(message)


async def gather_at_barrier(count: int) -> str:
    """Return only once ``count`` calls are inside this function at the same time."""
    import anyio

    global _arrived, _all_arrived
    if _all_arrived is None:
        _all_arrived = anyio.Event()
    _arrived += 1
    if _arrived == count:
        _all_arrived.set()
    await _all_arrived.wait()
    return "all here"


async def async_record(path: str, entry: str) -> str:
    """Journal ``start``, wait forever; journal ``cancelled`` when cancelled."""
    import anyio

    journal(path, f"start {entry}")
    try:
        await anyio.sleep_forever()
    finally:
        journal(path, f"cancelled {entry}")
    raise AssertionError("unreachable")  # pragma: no cover


async def async_shielded(path: str, seconds: float) -> str:
    """Shield itself from cancellation, so that it completes anyway."""
    import anyio

    journal(path, "start")
    with anyio.CancelScope(shield=True):
        await anyio.sleep(seconds)
    journal(path, "end")
    return "completed"


async def async_progress(emit: Any, count: int) -> str:
    for index in range(count):
        await emit(index)
    return "async done"


async def async_init(path: str) -> None:
    import anyio.lowlevel

    await anyio.lowlevel.checkpoint()
    journal(path, "async init")


async def current_backend() -> str:
    import sniffio

    return sniffio.current_async_library()


class AsyncCallable:
    """An object whose ``__call__`` is asynchronous: known only once it is called."""

    async def __call__(self, value: Any) -> Any:
        return value


def main_attribute(name: str) -> Any:
    """A name of this process's ``__main__`` (run_sync workers take on the parent's)."""
    return getattr(sys.modules["__main__"], name)


def set_event(event: Any) -> bool:
    """Set a multiprocessing manager's Event: the proxy needs the parent's authkey."""
    event.set()
    return event.is_set()  # type: ignore[no-any-return]


def emit_then_retire(value: Any) -> Any:
    """Use the child-side API of RPC workers: an event (outside any call's), then retire."""
    import trio_fork.worker

    trio_fork.worker.emit(("event", value))
    trio_fork.worker.retire()
    return value


# Hostile workers (tests/test_reliability_parent.py).


class Unprintable(Exception):
    """An exception whose ``str()`` fails: returns an int, or raises."""

    def __str__(self) -> str:
        if self.args[0] == "int":
            return 3  # type: ignore[return-value]
        raise RuntimeError("no str() for this exception")


def fail_unprintably(how: str | None) -> str:
    if how is None:
        return "fine"
    raise Unprintable(how)


async def async_fail_unprintably(how: str | None) -> str:
    import anyio.lowlevel

    await anyio.lowlevel.checkpoint()
    return fail_unprintably(how)


def own_socket() -> Any:
    """This worker's socket to the parent, found among its descriptors.

    The socketpair was made by the parent, so the peer credentials name another
    process (an event loop's own socketpairs name this one).
    """
    import socket
    import struct

    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if struct.unpack("3i", credentials)[0] != os.getpid():
                sock.setblocking(True)
                return sock
        sock.close()
    raise RuntimeError("no socket to the parent")


def garbage(kind: str) -> bytes:
    """What a worker that breaks the protocol sends, of several kinds."""
    from trio_fork.worker import _wire

    if kind == "unknown frame":  # and a payload that never comes
        return _wire.HEADER.pack(0xEE, 0, 1, 1 << 60)
    if kind == "descriptors":
        return _wire.HEADER.pack(_wire.RESULT, 3, 1, 1 << 40)
    if kind == "not a description":
        return _wire.HEADER.pack(_wire.ERROR, 0, 1, 4) + b"\xff\xff\xff\xff"
    if kind == "noise":
        return b"\xff" + bytes(range(256)) * 64
    raise ValueError(kind)


def misbehave(kind: str | None) -> int:
    """The worker's pid; or write garbage of ``kind`` onto the socket, and hang."""
    if kind is not None:
        with own_socket() as sock:
            sock.sendall(garbage(kind))
        time.sleep(3600)
    return os.getpid()


async def async_misbehave(kind: str | None) -> int:
    return misbehave(kind)


class _Evil:
    """Unpickled, it makes the directory ``path``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def forge(kind: str, path: str) -> str:
    """Send, ahead of this call's answer, a frame carrying a malicious pickle.

    The first call of a worker has id 1.
    """
    import pickle

    from trio_fork.worker import _wire

    evil = pickle.dumps(_Evil(path))
    if kind == "error with an original":
        frame = _wire.encode(_wire.ERROR, 1, _wire.pack_strings("E", "m", "t", evil))
    elif kind == "error as a pickle":
        frame = _wire.encode(_wire.ERROR, 1, evil)
    elif kind == "failed as a pickle":
        frame = _wire.encode(_wire.FAILED, 0, evil)
    elif kind == "ready as a pickle":
        frame = _wire.encode(_wire.WORKER_READY, 0, evil)
    else:
        raise ValueError(kind)
    with own_socket() as sock:
        _wire.send_blocking(sock, frame)
    return "answered already"


def die_in_the_first_init(path: str) -> None:
    """``init`` that kills the first worker that runs it (the one to create ``path``)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def fail_at_length(length: int) -> None:
    raise ValueError("x" * length)
