"""Timing loops shared by the rows, and the contract between rows and the runner.

A row is an async context manager that sets up whatever the row needs (a template, a
forkserver, a pool of workers), warms it up, and yields a :data:`Sampler`. Set-up
and warm-up are never timed; each call of the sampler times one sample.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import anyio

Sampler = Callable[[], Awaitable[float]]
"""Takes one sample: a rate per second, a latency in seconds, or a size in bytes."""


class Unavailable(Exception):
    """A row cannot be measured here; the message says why, and what would fix it."""


async def sequential_rate(
    once: Callable[[], Awaitable[object]], seconds: float, minimum: int
) -> float:
    """Iterations of ``once`` per second, one after another."""
    count = 0
    start = time.perf_counter()
    while True:
        await once()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= minimum:
            return count / elapsed


def blocking_rate(once: Callable[[], object], seconds: float, minimum: int) -> float:
    """:func:`sequential_rate` for a blocking ``once``.

    The rows that use it block the event loop on purpose: nothing else runs during a
    sample, and moving the loop to a thread would make every fork in it a fork of a
    multi-threaded process.
    """
    count = 0
    start = time.perf_counter()
    while True:
        once()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= minimum:
            return count / elapsed


async def concurrent_rate(
    once: Callable[[], Awaitable[object]], seconds: float, minimum: int, width: int
) -> float:
    """Iterations of ``once`` per second with ``width`` of them in flight at all times.

    Iterations still in flight at the deadline are finished and counted, and the time
    they take is counted too.
    """
    count = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline or count < minimum:
            await once()
            count += 1

    async with anyio.create_task_group() as task_group:
        for _ in range(width):
            task_group.start_soon(worker)
    return count / (time.perf_counter() - start)


async def median_latency(once: Callable[[], Awaitable[float]], seconds: float) -> float:
    """The median of the latencies that ``once`` returns, over at least ``seconds``.

    At least one call, however long it takes: a row that takes a second per call
    (trio_parallel starting eight workers) then costs one call per sample, and a row
    of a few milliseconds gets a median of many, which one hiccup cannot move.
    ``once`` times itself, so that it can leave out what follows the moment it
    measures (a pool's workers ending, say).
    """
    latencies: list[float] = []
    start = time.perf_counter()
    while not latencies or time.perf_counter() - start < seconds:
        latencies.append(await once())
    return statistics.median(latencies)


def entered_and_left(
    block: Callable[[], AbstractAsyncContextManager[object]],
) -> Callable[[], Awaitable[float]]:
    """A ``once`` for :func:`median_latency`: seconds to enter and leave a new ``block()``."""

    async def once() -> float:
        start = time.perf_counter()
        async with block():
            pass
        return time.perf_counter() - start

    return once
