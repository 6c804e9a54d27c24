"""The rows that start processes by forking: the floor, raw ``os.fork()``, trio_fork."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from .._open import open_template
from .._template import Template
from . import _forkloop
from ._measure import Sampler, concurrent_rate, sequential_rate

if TYPE_CHECKING:
    from ._report import Settings

# Defined in the template with eval() so that children never import this package
# (and with it trio and anyio): a child costs what a user's minimal worker costs.
_WORKERS = """
def one_byte(sock):
    sock.send(b"x")
"""


@asynccontextmanager
async def floor(settings: Settings, on_rss: Callable[[int], None]) -> AsyncIterator[Sampler]:
    """The fork loop in its own minimal interpreter: no site, no trio, no ballast."""
    command = [
        sys.executable,
        "-I",
        "-S",
        _forkloop.__file__,
        str(settings.sample_seconds),
        str(settings.min_iterations),
    ]

    async def sample() -> float:
        result = await anyio.run_process(command, stderr=None)
        count, elapsed, rss = result.stdout.split()
        on_rss(int(rss))
        return int(count) / float(elapsed)

    yield sample


@asynccontextmanager
async def os_fork(settings: Settings) -> AsyncIterator[Sampler]:
    """The fork loop in this process, with whatever ballast it holds."""
    _forkloop.fork_loop(0.0, 1)

    async def sample() -> float:
        # Blocks the event loop on purpose: see _measure.blocking_rate.
        count, elapsed = _forkloop.fork_loop(settings.sample_seconds, settings.min_iterations)
        return count / elapsed

    yield sample


@asynccontextmanager
async def spawn_template() -> AsyncIterator[Template]:
    """The template that every trio_fork spawn row forks from.

    One for all parent sizes: a template is a fresh interpreter, not a copy of its
    parent, so the rows then differ only in the ballast that the parent holds.
    """
    async with open_template() as template:
        await template.eval(_WORKERS)
        yield template


@asynccontextmanager
async def trio_fork_spawns(
    settings: Settings, template: Template, *, concurrency: int
) -> AsyncIterator[Sampler]:
    """Spawn a child from a template, receive one byte from it, wait for its exit.

    With ``concurrency`` above 1, that many spawns are in flight at all times.
    """

    async def once() -> None:
        async with template.spawn("__main__:one_byte") as child:
            byte = await child.stream.receive()
        if byte != b"x" or child.returncode != 0:
            raise RuntimeError(
                f"child {child.pid} failed (status {child.returncode}, sent {byte!r})"
            )

    async def sample() -> float:
        if concurrency == 1:
            return await sequential_rate(once, settings.sample_seconds, settings.min_iterations)
        return await concurrent_rate(
            once, settings.sample_seconds, settings.min_iterations, concurrency
        )

    async with anyio.create_task_group() as warm_up:
        for _ in range(concurrency):
            warm_up.start_soon(once)
    yield sample
