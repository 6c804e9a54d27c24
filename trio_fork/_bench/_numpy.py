"""The rows about a heavy import: numpy workers from a template, or from scratch.

Both kinds of worker do the same: have numpy imported, say so with one byte, and
(for the memory rows) wait idle until told to go. The memory rows hold several idle
workers of one kind at a time, and never both kinds at once, so that each kind
shares pages only with its own. A pool row starts several RPC workers at once from
a numpy template; its peer, trio_parallel starting as many, is in ``_peers``.

Whether numpy can be imported is checked in a template, not in this process: the
bench must not grow the parent whose fork it times.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from .._errors import RemoteError
from .._open import open_template
from .._pool import open_pool
from .._template import Template
from ._measure import Sampler, Unavailable, median_latency
from ._system import memory_use

if TYPE_CHECKING:
    from anyio.abc import Process

    from ._report import Settings

_TEMPLATE_WORKERS = """
def numpy_ready(sock):
    import numpy
    sock.send(b"x")

def numpy_idle(sock):
    import numpy
    sock.send(b"x")
    sock.recv(1)
"""
_FRESH_READY = "import numpy, sys; sys.stdout.buffer.write(b'x'); sys.stdout.flush()"
_FRESH_IDLE = _FRESH_READY + "; sys.stdin.buffer.read()"


async def check_numpy() -> None:
    """Raise :exc:`Unavailable` unless a template can import numpy.

    Trying it in a template also brings numpy's files into the page cache, so that
    the first timed start does not read them from disk.
    """
    hint = "pip install 'trio_fork[bench]'"
    if importlib.util.find_spec("numpy") is None:
        raise Unavailable(f"numpy is not installed ({hint})")
    try:
        async with open_template(preload=["numpy"]):
            pass
    except RemoteError as exc:
        raise Unavailable(
            f"numpy cannot be imported: {exc.type_name}: {exc.message} ({hint})"
        ) from None


@asynccontextmanager
async def numpy_template() -> AsyncIterator[Template]:
    async with open_template(preload=["numpy"]) as template:
        await template.eval(_TEMPLATE_WORKERS)
        yield template


@asynccontextmanager
async def first_spawns(settings: Settings) -> AsyncIterator[Sampler]:
    """Each call opens a new numpy template (untimed) and times its first spawn."""
    await check_numpy()

    async def once() -> float:
        async with numpy_template() as template:
            return await first_spawn(template)

    async def sample() -> float:
        return await median_latency(once, settings.sample_seconds)

    yield sample


@asynccontextmanager
async def fresh_starts(settings: Settings) -> AsyncIterator[Sampler]:
    """Each call times a new interpreter that imports numpy."""
    await check_numpy()

    async def sample() -> float:
        return await median_latency(fresh_start, settings.sample_seconds)

    yield sample


@asynccontextmanager
async def pool_starts(settings: Settings) -> AsyncIterator[Sampler]:
    """A pool of ``settings.pool_workers`` idle workers from one numpy template.

    Timed from asking for the pool until every worker is ready to serve calls: the
    pool's block starts with its ``idle`` workers ready. The template is opened once
    for the row, as a program keeps its template and opens pools from it.
    """
    await check_numpy()
    workers = settings.pool_workers
    async with numpy_template() as template:

        async def once() -> float:
            start = time.perf_counter()
            async with open_pool(template, os.getpid, max=workers, idle=workers) as pool:
                elapsed = time.perf_counter() - start
                if pool.statistics().idle_workers != workers:
                    raise RuntimeError(f"the pool was not ready: {pool.statistics()}")
            return elapsed

        async def sample() -> float:
            return await median_latency(once, settings.sample_seconds)

        await once()
        yield sample


async def first_spawn(template: Template) -> float:
    """Seconds from asking a numpy template for a child to that child's byte."""
    start = time.perf_counter()
    async with template.spawn("__main__:numpy_ready") as child:
        byte = await child.stream.receive()
        elapsed = time.perf_counter() - start
    if byte != b"x" or child.returncode != 0:
        raise RuntimeError(f"numpy child failed (status {child.returncode}, sent {byte!r})")
    return elapsed


async def _start_fresh(*, idle: bool) -> Process:
    # An idle one waits for the end of its stdin, a pipe that we close to end it.
    return await anyio.open_process(
        [sys.executable, "-c", _FRESH_IDLE if idle else _FRESH_READY],
        stdin=subprocess.PIPE if idle else subprocess.DEVNULL,
        stderr=None,
    )


async def _ready(process: Process) -> None:
    assert process.stdout is not None
    try:
        byte = await process.stdout.receive()
    except anyio.EndOfStream:
        byte = b""
    if byte != b"x":
        await process.wait()
        raise RuntimeError(f"python -c 'import numpy' failed (status {process.returncode})")


async def fresh_start() -> float:
    """Seconds from starting a new interpreter that imports numpy to its byte."""
    start = time.perf_counter()
    async with await _start_fresh(idle=False) as process:
        await _ready(process)
        elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"python -c 'import numpy' exited with status {process.returncode}")
    return elapsed


async def idle_children_memory(template: Template, count: int) -> list[tuple[int, int]]:
    """PSS and USS of each of ``count`` idle children of ``template``, alive at once."""
    async with AsyncExitStack() as stack:
        pids = []
        for _ in range(count):
            child = await stack.enter_async_context(template.spawn("__main__:numpy_idle"))
            if await child.stream.receive() != b"x":
                raise RuntimeError(f"numpy child {child.pid} did not get ready")
            pids.append(child.pid)
        # Leaving the stack closes each child's socket, which ends its wait.
        return [memory_use(pid) for pid in pids]


async def idle_fresh_memory(count: int) -> list[tuple[int, int]]:
    """PSS and USS of each of ``count`` idle fresh interpreters with numpy, alive at once."""
    async with AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(await _start_fresh(idle=True)) for _ in range(count)
        ]
        for process in processes:
            await _ready(process)
        # Leaving the stack closes each one's stdin, which ends its wait.
        return [memory_use(process.pid) for process in processes]
