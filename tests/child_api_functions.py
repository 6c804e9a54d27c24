"""What RPC workers run in the tests of the child-side API (trio_fork.worker).

Standard library and trio_fork.worker only. Journals are files named by the test, one
line per entry, read by the test after the fact.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import trio_fork.worker as worker
from tests.rpc_functions import journal as journal
from tests.rpc_functions import read_journal as read_journal


def emit_at_start() -> None:
    """An ``init`` that emits, itself and from a thread of its own."""
    worker.emit("from init")
    thread = threading.Thread(target=lambda: [worker.emit(("thread", n)) for n in range(3)])
    thread.start()
    thread.join()


def emit_and_return(value: Any) -> int:
    worker.emit(("in a call", value))
    return os.getpid()


async def async_emit_and_return(value: Any) -> int:
    worker.emit(("in a call", value))
    return os.getpid()


def emit_per_call_and_outside(emit: Any, value: Any) -> None:
    emit(("the call's", value))
    worker.emit(("outside", value))


def retire_when(value: Any) -> int:
    if value == "retire":
        worker.retire()
    return os.getpid()


async def async_retire_when(value: Any, path: str = "") -> int:
    if value == "retire":
        worker.retire()
    if path:
        journal(path, str(value))
    return os.getpid()


def done() -> None:
    journal(os.environ["TRIO_FORK_JOURNAL"], f"done {os.getpid()}")


async def async_done() -> None:
    journal(os.environ["TRIO_FORK_JOURNAL"], f"async done {os.getpid()}")


def sleep_forever(value: Any) -> None:
    threading.Event().wait()


async def async_sleep_forever(value: Any) -> None:
    import anyio

    await anyio.sleep_forever()


def child_api_outside_a_worker() -> list[str]:
    failures = []
    for function in (lambda: worker.emit(1), worker.retire):
        try:
            function()
        except RuntimeError as exc:
            failures.append(str(exc))
    return failures


def comm(pid: int | None = None) -> str:
    with open(f"/proc/{pid or os.getpid()}/comm") as file:
        return file.read().strip()


def write_late(sock: socket.socket, ready: str) -> None:
    """A child that writes only once the test says so (a file appears)."""
    while not os.path.exists(ready):
        time.sleep(0.01)
    sock.sendall(b"written late")


def read_handed_socket(sock: socket.socket) -> None:
    """Receive a socket, read it as a blocking one until end of file, say what came."""
    _, fds, _, _ = socket.recv_fds(sock, 1, 4)  # 1: CMSG_LEN, too short for one fd
    with socket.socket(fileno=fds[0]) as handed:
        data = b""
        try:
            while chunk := handed.recv(4096):
                data += chunk
        except BlockingIOError:
            data = b"BlockingIOError"
    sock.sendall(data)


def report_comm(sock: socket.socket) -> None:
    sock.sendall(comm().encode())
