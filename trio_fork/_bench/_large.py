"""The large-data rows: 256 MiB numpy arrays to and from a warm worker, and the peers.

Every row calls a function of numpy's, found by name in any worker, on a worker that
is already running (warmed up by a first call): ``numpy.max`` for an argument (the
worker reads all of it and returns one number), ``numpy.ones`` for a result (the
worker makes the array), ``numpy.negative`` for a round trip (an array in, a new one
of the same size out). Beside them: one copy of the array in this process, the
physical floor of sending it anywhere, into new memory (``a.copy()``, which numpy
puts in huge pages; ``bytearray``, in 4 KiB pages), into a new memfd (what the first
sending of a buffer costs, with the memfd's freeing), and into memory that exists
already (what a sending into a reused memfd costs); and a shared array sent at two
sizes.

These rows allocate arrays of hundreds of MiB, so they run after the rounds of the
other rows, which fork this process and must not find it grown (see the runner).
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_process
import anyio.to_thread

from .._run_sync import open_worker_context
from .._shared import shared_array
from ._measure import Sampler, Unavailable, median_latency
from ._peers import _trio_parallel

if TYPE_CHECKING:
    from ._progress import Progress
    from ._report import Settings

MIB = 1 << 20
SIZE = 256 * MIB
"""Bytes in the arrays of these rows."""
SMALL_SIZE = MIB
"""Bytes in the small shared array, against which the big one is compared."""
_HINT = "pip install 'trio_fork[bench]'"

Call = Callable[..., Awaitable[Any]]
"""``call(function, *args)``: run a function in a peer's (or our) warm worker."""


def _numpy() -> Any:
    if importlib.util.find_spec("numpy") is None:
        raise Unavailable(f"numpy is not installed ({_HINT})")
    try:
        import numpy
    except ImportError as exc:
        raise Unavailable(f"numpy cannot be imported: {exc} ({_HINT})") from None
    return numpy


def reset_peak() -> int:
    """Reset this process's peak resident size to its current one; that size, in bytes.

    Run in a worker too, by name: it is a function of this module.
    """
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM (Linux 4.0 and later)
    return _status("VmRSS")


def peak() -> int:
    """This process's peak resident size since :func:`reset_peak`, in bytes."""
    return _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


@asynccontextmanager
async def _trio_fork() -> AsyncIterator[Call]:
    async with open_worker_context(preload=["numpy"]) as context:
        yield context.run_sync


@asynccontextmanager
async def _anyio() -> AsyncIterator[Call]:
    yield anyio.to_process.run_sync


@asynccontextmanager
async def _trio_parallel_peer(settings: Settings) -> AsyncIterator[Call]:
    trio_parallel = _trio_parallel(settings)
    async with trio_parallel.open_worker_context() as context:
        yield context.run_sync


@asynccontextmanager
async def _process_pool() -> AsyncIterator[Call]:
    # spawn, as trio_parallel and anyio start theirs: a fork would copy this process.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:

        async def call(function: Callable[..., Any], *args: Any) -> Any:
            future = pool.submit(function, *args)
            return await anyio.to_thread.run_sync(future.result)

        yield call


@asynccontextmanager
async def _joblib() -> AsyncIterator[Call]:
    try:
        import joblib
    except ImportError:
        raise Unavailable(f"joblib is not installed ({_HINT})") from None
    # Its default: arrays over 1 MB are memory-mapped from files in /dev/shm.
    with joblib.Parallel(n_jobs=2, backend="loky") as parallel:

        async def call(function: Callable[..., Any], *args: Any) -> Any:
            def run() -> Any:
                (result,) = parallel([joblib.delayed(function)(*args)])
                return result

            return await anyio.to_thread.run_sync(run)

        yield call


_PEERS: dict[str, Callable[[Settings], AbstractAsyncContextManager[Call]]] = {
    "trio_fork": lambda settings: _trio_fork(),
    "anyio": lambda settings: _anyio(),
    "trio_parallel": _trio_parallel_peer,
    "ppe": lambda settings: _process_pool(),
    "joblib": lambda settings: _joblib(),
}


def row_keys() -> list[str]:
    """The keys of the rows of this module, in the order they are sampled."""
    keys = [f"large_arg_{peer}" for peer in ("trio_fork", "anyio", "trio_parallel", "ppe")]
    keys += [f"large_result_{peer}" for peer in ("trio_fork", "anyio", "trio_parallel", "ppe")]
    keys += ["large_roundtrip_trio_fork", "large_roundtrip_joblib"]
    keys += ["large_memcpy", "large_memcpy_4k", "large_memcpy_memfd", "large_memcpy_reused"]
    keys += ["large_shared_big", "large_shared_small"]
    keys += ["large_rss_trio_fork", "large_rss_ppe"]
    return keys


async def sample(settings: Settings, results: Any, progress: Progress) -> None:
    """Set every row up, then sample them round-robin, as the runner does the others.

    ``results`` has the runner's ``samples`` and ``notes``, by row key.
    """
    keys = row_keys()
    try:
        numpy = _numpy()
    except Unavailable as exc:
        for key in keys:
            results.notes[key] = f"skipped: {exc}"
        progress.step(f"skipped the large-data rows: {exc}", count=len(keys) * settings.rounds)
        return
    async with AsyncExitStack() as stack:
        progress.show("setting up the large-data rows")
        samplers = await _samplers(settings, stack, numpy)
        for key, sampler in samplers.items():
            if isinstance(sampler, Unavailable):
                results.notes[key] = f"skipped: {sampler}"
                progress.step(f"skipped {key}: {sampler}", count=settings.rounds)
        for number in range(1, settings.rounds + 1):
            for key in keys if number % 2 else reversed(keys):
                sampler = samplers[key]
                if isinstance(sampler, Unavailable):
                    continue
                progress.step(f"{key} (round {number}/{settings.rounds})")
                results.samples[key].append(await sampler())
        progress.show("closing down the large-data peers")


async def _samplers(
    settings: Settings, stack: AsyncExitStack, numpy: Any
) -> dict[str, Sampler | Unavailable]:
    """Every row's sampler, or why it cannot run; peers set up (and warmed) once."""
    array = numpy.arange(SIZE, dtype=numpy.uint8)
    peers: dict[str, Call | Unavailable] = {}
    for name, open_peer in _PEERS.items():
        try:
            call = await stack.enter_async_context(open_peer(settings))
            await call(numpy.max, array[:10])  # warm: workers started, numpy imported
            peers[name] = call
        except Unavailable as exc:
            peers[name] = exc

    def timed(call: Call | Unavailable, function: Any, *args: Any) -> Sampler | Unavailable:
        if isinstance(call, Unavailable):
            return call

        async def once() -> float:
            start = time.perf_counter()
            await call(function, *args)
            return time.perf_counter() - start

        return functools.partial(median_latency, once, settings.sample_seconds)

    samplers: dict[str, Sampler | Unavailable] = {}
    for name in ("trio_fork", "anyio", "trio_parallel", "ppe"):
        samplers[f"large_arg_{name}"] = timed(peers[name], numpy.max, array)
        samplers[f"large_result_{name}"] = timed(peers[name], numpy.ones, SIZE, numpy.uint8)
    for name in ("trio_fork", "joblib"):
        samplers[f"large_roundtrip_{name}"] = timed(peers[name], numpy.negative, array)
    samplers["large_memcpy"] = _copy(settings, array.copy)
    samplers["large_memcpy_4k"] = _copy(settings, lambda: bytearray(memoryview(array)))
    samplers["large_memcpy_memfd"] = _copy(settings, functools.partial(_into_memfd, array))
    reused = numpy.ones_like(array)  # its pages exist: no page fault, as in a reused memfd
    samplers["large_memcpy_reused"] = _copy(settings, lambda: numpy.copyto(reused, array))
    big, small = shared_array(SIZE, numpy.uint8), shared_array(SMALL_SIZE, numpy.uint8)
    # len: the time to send it, which must not grow with its size, not to read it all.
    samplers["large_shared_big"] = timed(peers["trio_fork"], len, big)
    samplers["large_shared_small"] = timed(peers["trio_fork"], len, small)
    for name in ("trio_fork", "ppe"):
        samplers[f"large_rss_{name}"] = _rss(peers[name], numpy.max, array)
    return samplers


def _copy(settings: Settings, copy: Callable[[], object]) -> Sampler:
    async def once() -> float:
        start = time.perf_counter()
        copy()
        return time.perf_counter() - start

    return functools.partial(median_latency, once, settings.sample_seconds)


def _into_memfd(array: Any) -> None:
    """One copy into a new memfd, as a buffer's first sending makes it; then freed."""
    fd = os.memfd_create("trio_fork bench", os.MFD_CLOEXEC)
    try:
        view = memoryview(array).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def _rss(call: Call | Unavailable, function: Any, array: Any) -> Sampler | Unavailable:
    """Peak resident size of this process and the worker during a call, above before."""
    if isinstance(call, Unavailable):
        return call

    async def sample() -> float:
        pid, worker_base = await call(_worker_reset)
        base = reset_peak()
        await call(function, array)
        above = peak() - base
        worker_pid, worker_peak = await call(_worker_peak)
        if worker_pid != pid:
            raise RuntimeError("the RSS row's calls went to different workers")
        return float(above + worker_peak - worker_base)

    return sample


def _worker_reset() -> tuple[int, int]:
    return os.getpid(), reset_peak()


def _worker_peak() -> tuple[int, int]:
    return os.getpid(), peak()
