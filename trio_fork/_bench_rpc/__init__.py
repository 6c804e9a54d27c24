"""Measurements of RPC, pools and ``run_sync``, against ``anyio.to_process`` and trio_parallel.

Each figure is made of *rows*. A row is an async context manager that sets up what
it needs (a template, a pool, a peer's workers), warms it up, and yields a sampler:
an async function that takes one sample and returns it (a rate per second, or a
latency in seconds). Set-up and warm-up are never timed. :func:`measure` samples the
rows of a figure in turn, round after round, so that a change of load on the machine
hits them all alike, and reports medians and the ratio of each round.

The work sent to workers is done by standard-library functions, so that no peer's
worker imports this package (and with it trio) only to find it. The peers are
optional (the ``bench`` extra); a row whose peer is missing says so.

``python -m trio_fork._bench_rpc`` runs every figure and prints a table.
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.to_process
import attrs
import sniffio

from .._pool import open_pool
from .._rpc import open_rpc
from .._run_sync import run_sync
from .._template import open_template

Sampler = Callable[[], Awaitable[float]]
Row = Callable[[], AbstractAsyncContextManager[Sampler]]

WORKERS = 8
"""Workers started at once by the start-up figure."""
PIPELINE = 256
"""Calls in flight at once in the pipelined figure."""


class Unavailable(Exception):
    """A row cannot be measured here; the message says why, and what would fix it."""


async def sequential_rate(once: Callable[[], Awaitable[object]], seconds: float) -> float:
    """Calls of ``once`` per second, one after another, for at least ``seconds``."""
    count = 0
    start = time.perf_counter()
    while True:
        await once()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


async def pipelined_rate(
    once: Callable[[], Awaitable[object]], seconds: float, width: int
) -> float:
    """Calls of ``once`` per second with ``width`` of them in flight at all times."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def lane() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await once()
            count += 1

    async with anyio.create_task_group() as group:
        for _ in range(width):
            group.start_soon(lane)
    return count / (time.perf_counter() - start)


def _peer(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Unavailable(f"{name} is not installed (pip install 'trio_fork[bench]')") from None


# Sequential run_sync calls on warm workers.


def run_sync_rows(seconds: float) -> dict[str, Row]:
    """``run_sync`` of trio_fork and of the peers, one call after another."""

    @asynccontextmanager
    async def trio_fork_run_sync() -> AsyncIterator[Sampler]:
        async def once() -> None:
            await run_sync(os.getpid)

        await once()
        yield lambda: sequential_rate(once, seconds)

    @asynccontextmanager
    async def anyio_to_process() -> AsyncIterator[Sampler]:
        async def once() -> None:
            await anyio.to_process.run_sync(os.getpid)

        await once()
        yield lambda: sequential_rate(once, seconds)

    @asynccontextmanager
    async def trio_parallel_run_sync() -> AsyncIterator[Sampler]:
        if sniffio.current_async_library() != "trio":
            raise Unavailable("trio_parallel runs only on trio")
        trio_parallel = _peer("trio_parallel")
        async with trio_parallel.open_worker_context() as context:

            async def once() -> None:
                await context.run_sync(os.getpid)

            await once()
            yield lambda: sequential_rate(once, seconds)

    return {
        "trio_fork.run_sync": trio_fork_run_sync,
        "anyio.to_process.run_sync": anyio_to_process,
        "trio_parallel.run_sync": trio_parallel_run_sync,
    }


# Many small calls in flight to one async worker.


def pipelined_rpc_rows(seconds: float, width: int = PIPELINE) -> dict[str, Row]:
    """RPC calls to one async-backend worker, ``width`` of them in flight."""

    @asynccontextmanager
    async def trio_fork_rpc() -> AsyncIterator[Sampler]:
        async with open_template() as template:
            await template.eval("async def echo(value):\n    return value\n")
            async with open_rpc(template, "__main__:echo") as rpc:

                async def once() -> None:
                    await rpc.call(1)

                await pipelined_rate(once, 0.2, width)
                yield lambda: pipelined_rate(once, seconds, width)

    return {"trio_fork RPC, async worker": trio_fork_rpc}


# A pool of workers that can use numpy, from nothing to all ready.


def start_up_rows(workers: int = WORKERS) -> dict[str, Row]:
    """Seconds until ``workers`` workers are ready to run numpy code."""

    @asynccontextmanager
    async def trio_fork_pool() -> AsyncIterator[Sampler]:
        _peer("numpy")
        async with open_template(preload=["numpy"]) as template:

            async def sample() -> float:
                start = time.perf_counter()
                async with open_pool(template, os.getpid, max=workers, idle=workers):
                    ready = time.perf_counter() - start
                return ready

            await sample()
            yield sample

    @asynccontextmanager
    async def trio_parallel_workers() -> AsyncIterator[Sampler]:
        if sniffio.current_async_library() != "trio":
            raise Unavailable("trio_parallel runs only on trio")
        _peer("numpy")
        trio_parallel = _peer("trio_parallel")
        limiter = anyio.CapacityLimiter(workers)

        async def sample() -> float:
            async with trio_parallel.open_worker_context() as context:
                start = time.perf_counter()
                async with anyio.create_task_group() as group:
                    for _ in range(workers):
                        group.start_soon(
                            _import_in, context, limiter, "numpy", name="trio_parallel worker"
                        )
                return time.perf_counter() - start

        yield sample

    return {
        f"trio_fork pool of {workers}": trio_fork_pool,
        f"trio_parallel, {workers} workers": trio_parallel_workers,
    }


async def _import_in(context: Any, limiter: anyio.CapacityLimiter, module: str) -> None:
    # exec() returns None, which pickles; import_module() returns the module.
    await context.run_sync(exec, f"import {module}", limiter=limiter)


# Sampling.


@attrs.frozen
class Figure:
    """The samples of one figure's rows, round by round."""

    samples: dict[str, list[float]]
    unavailable: dict[str, str]

    def median(self, row: str) -> float | None:
        values = self.samples.get(row)
        return statistics.median(values) if values else None

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """The median over rounds of ``numerator / denominator``."""
        tops, bottoms = self.samples.get(numerator), self.samples.get(denominator)
        if not tops or not bottoms:
            return None
        return statistics.median(top / bottom for top, bottom in zip(tops, bottoms, strict=True))


async def measure(rows: dict[str, Row], rounds: int) -> Figure:
    """Sample every row once per round, in turn, for ``rounds`` rounds.

    Every row stays set up, and warm, for the whole figure.
    """
    samplers: dict[str, Sampler] = {}
    unavailable: dict[str, str] = {}
    samples: dict[str, list[float]] = {}
    async with AsyncExitStack() as stack:
        for name, row in rows.items():
            try:
                samplers[name] = await stack.enter_async_context(row())
            except Unavailable as exc:
                unavailable[name] = str(exc)
        for _ in range(rounds):
            for name, sampler in samplers.items():
                samples.setdefault(name, []).append(await sampler())
    return Figure(samples, unavailable)


@attrs.frozen
class Results:
    """The four figures of issue 6, and whether each target was met."""

    backend: str
    run_sync: Figure
    pipelined: Figure
    start_up: Figure

    def targets(self) -> list[tuple[str, float | None, str, bool | None]]:
        """(what, measured, target, met) for each target."""
        ours = "trio_fork.run_sync"
        versus_anyio = self.run_sync.ratio(ours, "anyio.to_process.run_sync")
        versus_trio_parallel = self.run_sync.ratio(ours, "trio_parallel.run_sync")
        pipelined = self.pipelined.median("trio_fork RPC, async worker")
        pool = self.start_up.median(f"trio_fork pool of {WORKERS}")
        speed_up = self.start_up.ratio(
            f"trio_parallel, {WORKERS} workers", f"trio_fork pool of {WORKERS}"
        )

        def met(value: float | None, ok: Callable[[float], bool]) -> bool | None:
            return None if value is None else ok(value)

        return [
            (
                "run_sync vs anyio.to_process (x)",
                versus_anyio,
                ">= 2",
                met(versus_anyio, lambda v: v >= 2),
            ),
            (
                "run_sync vs trio_parallel (x)",
                versus_trio_parallel,
                ">= 3",
                met(versus_trio_parallel, lambda v: v >= 3),
            ),
            ("pipelined RPC calls/s", pipelined, ">= 20000", met(pipelined, lambda v: v >= 20_000)),
            (
                f"pool of {WORKERS} ready (ms)",
                None if pool is None else pool * 1e3,
                "<= 50",
                met(pool, lambda v: v <= 0.05),
            ),
            (
                f"pool of {WORKERS} vs trio_parallel (x)",
                speed_up,
                ">= 20",
                met(speed_up, lambda v: v >= 20),
            ),
        ]


async def measure_all(rounds: int = 7, seconds: float = 0.5) -> Results:
    """Every figure, on the running event loop's backend."""
    return Results(
        sniffio.current_async_library(),
        await measure(run_sync_rows(seconds), rounds),
        await measure(pipelined_rpc_rows(seconds), rounds),
        await measure(start_up_rows(), rounds),
    )


def render(results: Results) -> str:
    """The figures and the targets as a plain-text table."""
    lines = [f"trio_fork RPC, pools and run_sync on {results.backend} (medians of rounds)", ""]
    for title, figure, unit in [
        ("sequential run_sync, warm workers", results.run_sync, "calls/s"),
        (f"pipelined RPC, {PIPELINE} calls in flight", results.pipelined, "calls/s"),
        (f"{WORKERS} workers able to use numpy, from nothing", results.start_up, "ms"),
    ]:
        lines.append(title)
        for row in figure.samples:
            value = figure.median(row)
            assert value is not None
            shown = f"{value * 1e3:10.1f} ms" if unit == "ms" else f"{value:10.0f} {unit}"
            lines.append(f"  {row:38} {shown}")
        for row, why in figure.unavailable.items():
            lines.append(f"  {row:38} not measured: {why}")
        lines.append("")
    lines.append("targets")
    for what, value, target, met in results.targets():
        shown = "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[met]
        lines.append(f"  {what:38} {shown:>10}  (target {target}) {verdict}")
    return "\n".join(lines) + "\n"
