"""What belongs to each event loop run: the backend's own primitives, and the default limiter.

run_sync's workers belong to no event loop; a call talks to one with the waits of the
loop it runs in, looked up once per run rather than on every call.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import sniffio


@attrs.define(eq=False, slots=True)
class Run:
    """One event loop run, as run_sync calls use it."""

    backend: str
    limiter: Any
    limiter_type: type[Any]
    would_block: type[Exception]
    cancelled: type[BaseException]
    checkpoint_if_cancelled: Callable[[], Awaitable[None]]
    wait_readable: Callable[[Any], Awaitable[None]]
    wait_writable: Callable[[Any], Awaitable[None]]


# Keyed like anyio's RunVar (by trio token or asyncio loop), without its cost on
# every call.
_runs: weakref.WeakKeyDictionary[object, Run] = weakref.WeakKeyDictionary()


def this_run() -> Run:
    backend = sniffio.current_async_library()
    key: object
    if backend == "trio":
        key = sys.modules["trio"].lowlevel.current_trio_token()
    else:
        key = asyncio.get_running_loop()
    run = _runs.get(key)
    if run is None:
        run = _runs[key] = _new_run(backend)
    return run


def _new_run(backend: str) -> Run:
    tokens = os.cpu_count() or 1
    if backend == "trio":
        import trio

        return Run(
            backend,
            trio.CapacityLimiter(tokens),
            trio.CapacityLimiter,
            trio.WouldBlock,
            trio.Cancelled,
            trio.lowlevel.checkpoint_if_cancelled,
            trio.lowlevel.wait_readable,
            trio.lowlevel.wait_writable,
        )
    limiter = anyio.CapacityLimiter(tokens)

    async def wait_readable(sock: socket.socket) -> None:
        # anyio.wait_readable without its bookkeeping (a worker is one caller's alone),
        # and with the descriptor's number: asyncio formats an error message with the
        # socket's repr (a getsockname() call) each time it registers one. The loop is
        # looked up, not kept: the run is kept only as long as its loop is.
        fd = sock.fileno()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.add_reader(fd, _wake, future)
        try:
            await future
        finally:
            loop.remove_reader(fd)

    return Run(
        backend,
        limiter,
        type(limiter),
        anyio.WouldBlock,
        asyncio.CancelledError,
        anyio.lowlevel.checkpoint_if_cancelled,
        wait_readable,
        anyio.wait_writable,
    )


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
