"""The rows that measure other ways to run Python code in another process.

Each does the job of a trio_fork row as that library would do it: start a worker
that sends something back and wait until it is gone, call a worker that is already
running, or start workers that import numpy. The functions they run are of the
standard library, so no worker imports this package (and with it trio) only to find
them.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from typing import TYPE_CHECKING, Any

import anyio.to_process

from . import _numpy
from ._measure import Sampler, Unavailable, blocking_rate, median_latency, sequential_rate

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


def _trio_parallel(settings: Settings) -> Any:
    """The trio_parallel module, if this run can use it."""
    if settings.backend != "trio":
        raise Unavailable(f"trio_parallel runs only on Trio, and this run is on {settings.backend}")
    try:
        import trio_parallel
    except ImportError:
        raise Unavailable(f"trio_parallel is not installed ({_INSTALL_HINT})") from None
    return trio_parallel


@asynccontextmanager
async def trio_parallel_calls(settings: Settings, *, fresh: bool) -> AsyncIterator[Sampler]:
    """``trio_parallel.run_sync``, with its default (spawn) workers.

    With ``fresh``, every worker retires after one call, so each call starts one.
    """
    trio_parallel = _trio_parallel(settings)
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


@asynccontextmanager
async def trio_parallel_pool_starts(settings: Settings) -> AsyncIterator[Sampler]:
    """trio_parallel starting ``settings.pool_workers`` workers that import numpy.

    The peer of the numpy pool row: its workers are fresh interpreters, so each one
    imports numpy itself. Timed from the first call until every worker has imported
    it, in a new worker context each time (its workers end with it). Not warmed up,
    as each call is a first start on purpose: the numpy check and the other
    trio_parallel rows have already brought the files it reads into the page cache.
    """
    trio_parallel = _trio_parallel(settings)
    await _numpy.check_numpy()
    workers = settings.pool_workers

    async def once() -> float:
        limiter = anyio.CapacityLimiter(workers)
        async with trio_parallel.open_worker_context() as context:
            start = time.perf_counter()
            async with anyio.create_task_group() as task_group:
                for _ in range(workers):
                    # exec() returns None, which pickles; the module would not.
                    task_group.start_soon(
                        functools.partial(context.run_sync, exec, "import numpy", limiter=limiter)
                    )
            return time.perf_counter() - start

    async def sample() -> float:
        return await median_latency(once, settings.sample_seconds)

    yield sample
