"""The run_process rows: a program started from a template, against the peers.

``Template.run_process`` against ``anyio.run_process`` and ``trio.run_process``, each
running ``/bin/true`` and waiting for it, from this process with no ballast and with
2 GB. CPython's :mod:`subprocess` (which both peers use) starts a program with
``vfork``, whose cost does not grow with the parent; it must ``fork`` instead when
the program runs as a given user (``user=``, even this process's own), and then the
parent's page tables are copied for every program: the ``as_user`` rows show that
case. (The default template's row runs in a helper process: see ``_helper``.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

from ._measure import Sampler, Unavailable, sequential_rate
from ._report import EXEC_BALLASTS_MB, EXEC_RUNNERS, ballast_key

if TYPE_CHECKING:
    from .._template import Template
    from ._report import Settings

_PROGRAM = ["/bin/true"]


def keys_at(megabytes: int) -> list[str]:
    """The keys of the run_process rows sampled with ``megabytes`` of ballast."""
    if megabytes not in EXEC_BALLASTS_MB:
        return []
    return [ballast_key(base, megabytes) for base in EXEC_RUNNERS]


@asynccontextmanager
async def run_process_rows(
    settings: Settings, template: Template, key: str
) -> AsyncIterator[Sampler]:
    """Run ``/bin/true`` and wait for it, the way row ``key`` says."""
    base = key.rsplit("_", 1)[0]
    options: dict[str, Any] = {"user": os.getuid()} if base.startswith("exec_as_user_") else {}
    run: Callable[[], Awaitable[object]]
    if base.endswith("_trio_fork"):

        async def run() -> object:
            return await template.run_process(_PROGRAM, **options)

    elif base.endswith("_anyio"):

        async def run() -> object:
            return await anyio.run_process(_PROGRAM, **options)

    else:
        if sniffio.current_async_library() != "trio":
            raise Unavailable(
                f"trio.run_process runs only on Trio, and this run is on {settings.backend}"
            )
        import trio

        async def run() -> object:
            return await trio.run_process(_PROGRAM, capture_stdout=True, capture_stderr=True)

    await run()

    async def sample() -> float:
        return await sequential_rate(run, settings.sample_seconds, settings.min_iterations)

    yield sample
