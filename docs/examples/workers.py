"""Worker functions for the examples of the user guide.

This module is what a template imports, so it imports only the standard library:
whatever it imports at the top, every template that preloads it carries.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anyio.abc import UNIXSocketStream


def greet(sock: socket.socket, name: str) -> None:
    sock.sendall(f"hello {name}, from process {os.getpid()}".encode())


def nap(sock: socket.socket, seconds: float) -> None:
    time.sleep(seconds)


def write_to(sock: socket.socket, fd: int, text: str) -> None:
    os.write(fd, f"{text} (written by process {os.getpid()})\n".encode())
    os.close(fd)


def exit_with(sock: socket.socket, code: int) -> None:
    sock.recv(1)  # runs until the parent lets go: leaving its block closes the stream
    sys.exit(code)


def divide(sock: socket.socket, a: int, b: int) -> None:
    sock.sendall(str(a / b).encode())


def wait_for_signal(sock: socket.socket) -> None:
    sock.sendall(b"ready")
    while True:
        time.sleep(60)


def serve_until_terminated(sock: socket.socket) -> None:
    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    sock.sendall(b"ready")
    try:
        while True:
            time.sleep(60)
    finally:
        print("  worker: SIGTERM, cleaning up before exiting")


def accept_one(sock: socket.socket, listener_fd: int, worker: int) -> None:
    with socket.socket(fileno=listener_fd) as listener:
        connection, _ = listener.accept()
    with connection:
        connection.sendall(f"worker {worker} (pid {os.getpid()}) says hi\n".encode())


async def shout(stream: UNIXSocketStream) -> None:
    import sniffio

    backend = sniffio.current_async_library()
    async for data in stream:
        await stream.send(f"{data.decode().upper()} (from {backend})".encode())
