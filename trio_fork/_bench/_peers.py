"""The rows that measure other ways to run Python code in another process.

Each does the same job as the trio_fork rows as that library would do it: start a
worker that sends something back, then wait until it is gone. The targets are
functions of the standard library, so no worker imports this package (and with it
trio) only to find them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from typing import TYPE_CHECKING

import anyio.to_process

from ._measure import Sampler, Unavailable, blocking_rate, sequential_rate

if TYPE_CHECKING:
    from ._report import Settings

_INSTALL_HINT = "pip install 'trio_fork[bench]'"


@asynccontextmanager
async def multiprocessing_processes(
    settings: Settings, context: ForkContext | ForkServerContext | SpawnContext
) -> AsyncIterator[Sampler]:
    """A :class:`multiprocessing.Process` per job, from ``context``."""
    method = context.get_start_method()

    def once() -> None:
        receiver, sender = context.Pipe(duplex=False)
        with receiver:
            # A bound method of a Connection pickles (with the connection) for the
            # spawn and forkserver methods, and needs nothing but multiprocessing.
            process = context.Process(target=sender.send_bytes, args=(b"x",))
            try:
                process.start()
            finally:
                sender.close()
            byte = receiver.recv_bytes()
            process.join()
        if byte != b"x" or process.exitcode != 0:
            raise RuntimeError(f"{method} process failed (status {process.exitcode})")
        process.close()

    once()  # also starts the forkserver, which is not what a sample should time

    async def sample() -> float:
        # Blocks the event loop, as multiprocessing does: see blocking_rate.
        return blocking_rate(once, settings.sample_seconds, settings.min_iterations)

    yield sample


@asynccontextmanager
async def trio_parallel_calls(settings: Settings, *, fresh: bool) -> AsyncIterator[Sampler]:
    """``trio_parallel.run_sync``, with its default (spawn) workers.

    With ``fresh``, every worker retires after one call, so each call starts one.
    """
    if settings.backend != "trio":
        raise Unavailable(f"trio_parallel runs only on Trio, and this run is on {settings.backend}")
    try:
        import trio_parallel
    except ImportError:
        raise Unavailable(f"trio_parallel is not installed ({_INSTALL_HINT})") from None
    # retire is called in the worker after each job; a true result retires it.
    retire = functools.partial(bool, fresh)
    async with trio_parallel.open_worker_context(retire=retire) as context:

        async def once() -> None:
            pid = await context.run_sync(os.getpid)
            if not isinstance(pid, int):
                raise RuntimeError(f"trio_parallel worker returned {pid!r}")

        async def sample() -> float:
            return await sequential_rate(once, settings.sample_seconds, settings.min_iterations)

        await once()
        yield sample


@asynccontextmanager
async def anyio_to_process(settings: Settings) -> AsyncIterator[Sampler]:
    """``anyio.to_process.run_sync``, which keeps its workers for later calls."""

    async def once() -> None:
        await anyio.to_process.run_sync(os.getpid)

    async def sample() -> float:
        return await sequential_rate(once, settings.sample_seconds, settings.min_iterations)

    await once()
    yield sample
