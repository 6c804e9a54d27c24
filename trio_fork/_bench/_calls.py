"""trio_fork's rows of calls to workers that are already running: run_sync and RPC.

They sit next to the peers' rows of the same kind (``trio_parallel.run_sync`` with
cached workers, ``anyio.to_process.run_sync``), which do the same work: a call of a
standard-library function whose result is small.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .._open import open_template
from .._rpc import open_rpc
from .._run_sync import run_sync
from ._measure import Sampler, concurrent_rate, sequential_rate

if TYPE_CHECKING:
    from ._report import Settings

# Defined in the template with eval(), as the spawn rows' targets are: the worker
# then imports nothing of this package.
_ECHO = """
async def echo(value):
    return value
"""


@asynccontextmanager
async def run_sync_calls(settings: Settings) -> AsyncIterator[Sampler]:
    """``trio_fork.run_sync``, one call after another, on its default pool."""

    async def once() -> None:
        await run_sync(os.getpid)

    async def sample() -> float:
        return await sequential_rate(once, settings.sample_seconds, settings.min_iterations)

    await once()  # starts the default pool and its first worker
    yield sample


@asynccontextmanager
async def pipelined_rpc(settings: Settings) -> AsyncIterator[Sampler]:
    """Small calls to one async-backend RPC worker, many in flight at all times.

    An ``async def`` function is served by an event loop in the worker, so the calls
    overlap there too, and the parent writes them without waiting for replies.
    """
    async with open_template() as template:
        await template.eval(_ECHO)
        async with open_rpc(template, "__main__:echo") as rpc:

            async def once() -> None:
                if await rpc.call(1) != 1:
                    raise RuntimeError("the RPC worker's echo answered something else")

            async def sample() -> float:
                return await concurrent_rate(
                    once, settings.sample_seconds, settings.min_iterations, settings.rpc_in_flight
                )

            await concurrent_rate(once, 0.0, settings.rpc_in_flight, settings.rpc_in_flight)
            yield sample
