"""The Early rows: ``open_template()`` in a program that called ``start_early()`` first,
and in one that did not.

:func:`~trio_fork.start_early` belongs first thing in a program, before its heavy
imports and before any event loop runs, and from then on it changes what every
:func:`~trio_fork.open_template` of the process does. The bench process can do
neither: it has run an event loop for a while by the time its rows are set up, and
its other rows must open templates the ordinary way. So each of the two rows runs in
a helper process of its own, started by :func:`open_templates` and running
:data:`_PROGRAM`: it imports trio_fork, calls ``start_early()`` first thing (or, for
the other row, does not), and only then imports the bench and serves samples. The
two helpers differ in that call alone.

The helpers stay up for the whole run and take one sample per request, so that the
rows are sampled round-robin with all the others. A request is a line on the
helper's stdin, the sample's length in seconds; the reply is a line with the median
time to enter and leave ``open_template()``. End of file on stdin ends the helper,
and with it its early template.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from .._template import open_template
from ._measure import Sampler, entered_and_left, median_latency

if TYPE_CHECKING:
    from ._report import Settings

# The helper's main program, run with python -c ROOT MODE BACKEND. ROOT is where this
# trio_fork was imported from, so that the helper runs the same one.
_PROGRAM = """
import sys

sys.path.insert(0, sys.argv[1])
import trio_fork

if sys.argv[2] == "early":
    trio_fork.start_early()

from trio_fork._bench._early import serve

serve(sys.argv[3])
"""
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve(backend: str) -> None:
    """The helper's side: answer each line of stdin with a sample.

    Each sample runs in an event loop of its own: Early serves every event loop of
    the program, one after another, as the fixtures' session template does.
    """
    once = entered_and_left(open_template)

    async def sample(seconds: float) -> float:
        return await median_latency(once, seconds)

    for line in sys.stdin:
        print(anyio.run(sample, float(line), backend=backend), flush=True)


@asynccontextmanager
async def open_templates(settings: Settings, *, early: bool) -> AsyncIterator[Sampler]:
    """``open_template()`` entered and left, in a helper with or without Early."""
    mode = "early" if early else "plain"
    command = [sys.executable, "-c", _PROGRAM, _ROOT, mode, settings.backend]
    async with await anyio.open_process(command, stderr=None) as helper:
        assert helper.stdin is not None
        assert helper.stdout is not None
        requests = helper.stdin
        replies = BufferedByteReceiveStream(helper.stdout)

        async def sample_of(seconds: float) -> float:
            try:
                await requests.send(f"{seconds!r}\n".encode())
                return float(await replies.receive_until(b"\n", 100))
            except (anyio.BrokenResourceError, anyio.IncompleteRead):
                await helper.wait()
                raise RuntimeError(
                    f"the open_template() helper ({mode}) exited with status {helper.returncode}"
                ) from None

        async def sample() -> float:
            return await sample_of(settings.sample_seconds)

        await sample_of(0.0)  # the warm-up: one open_template(), untimed
        yield sample
