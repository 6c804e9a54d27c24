"""Rows that run in a helper process of their own, sampled like the others.

Every row runs in the bench process, but for the floor (in a minimal interpreter of
its own) and five rows whose effect on that process would be wrong for them or for
the other rows:

- the ``open_template`` rows. :func:`~trio_fork.start_early` belongs first thing in a
  program, before its heavy imports and before any event loop runs, and from then on
  it changes what every :func:`~trio_fork.open_template` of the process does. The
  bench process can do neither: it has run an event loop for a while by the time its
  rows are set up, and its other rows must open templates the ordinary way. So
  ``open_template()`` is timed in helpers that differ in one call alone: one calls
  ``start_early()`` first thing, the others do not; of those, one asks for a fresh
  interpreter each time (``fresh=True``), the other forks the default template
  (started in the untimed warm-up).
- the two pool rows. Starting and ending trio_fork pools leaves the heap of the
  process that opens them larger (each worker's connection has receive buffers of
  128 KiB and more, freed in an order that fragments it), by several MiB a sample;
  in the bench process that would grow, round after round, the very parent that the
  ``os.fork()`` and ``multiprocessing`` fork rows fork. trio_parallel starting eight
  workers leaves eight threads in its thread cache, and a process with threads
  forks about a tenth slower. Both sides of the comparison run in helpers alike.

A helper runs :data:`_PROGRAM`: it imports trio_fork, calls ``start_early()`` if its
row needs it, and only then imports the bench, sets its row up and warms it up,
and says ``ready``. Then it takes one sample per request: a line on its stdin, to
which it answers with a line holding the sample. End of file on stdin ends it,
whether the bench closed it or died; it ignores Ctrl-C, which the bench handles.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import anyio
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream

from . import _fixtures, _numpy, _peers
from ._measure import Sampler, Unavailable
from ._report import Settings

HOSTED_ROWS = {
    "open_template_plain": False,
    "open_template_early": True,
    "open_template_default": False,
    "numpy_pool_ready": False,
    "trio_parallel_numpy_pool": False,
}
"""The rows run in a helper, each with whether the helper calls start_early() first."""

# The helper's main program, run with python -c ROOT EARLY KEY SETTINGS. ROOT is
# where this trio_fork was imported from, so that the helper runs the same one.
_PROGRAM = """
import signal
import sys

# A Ctrl-C goes to the bench, which then closes our stdin: that is how we end.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.path.insert(0, sys.argv[1])
import trio_fork

if sys.argv[2] == "early":
    trio_fork.start_early()

from trio_fork._bench._helper import serve

serve(sys.argv[3], sys.argv[4])
"""
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_READY = b"ready"
_UNAVAILABLE = b"unavailable: "


def _row(key: str, settings: Settings) -> AbstractAsyncContextManager[Sampler]:
    if key == "numpy_pool_ready":
        return _numpy.pool_starts(settings)
    if key == "trio_parallel_numpy_pool":
        return _peers.trio_parallel_pool_starts(settings)
    # The open_template rows: entered and left, which is exactly what a fixture that
    # starts a fresh template (with no preload) does.
    return _fixtures.fresh_template_fixture(settings, (), fresh=key == "open_template_plain")


def serve(key: str, settings: str) -> None:
    """The helper's side: set row ``key`` up, then answer each request with a sample."""
    parsed = Settings(**json.loads(settings))
    anyio.run(_serve, _row(key, parsed), backend=parsed.backend)


async def _serve(row: AbstractAsyncContextManager[Sampler]) -> None:
    async with AsyncExitStack() as stack:
        try:
            sampler = await stack.enter_async_context(row)
        except Unavailable as exc:
            _reply(_UNAVAILABLE + str(exc).encode())
            return
        _reply(_READY)
        while await _request():
            _reply(repr(await sampler()).encode())


async def _request() -> bool:
    """Wait for the next request: False at the end of stdin."""
    # Requests are never sent before the previous answer, so one read is one line.
    await anyio.wait_readable(sys.stdin.fileno())
    return bool(os.read(sys.stdin.fileno(), 4096))


def _reply(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.flush()


@asynccontextmanager
async def hosted(settings: Settings, key: str) -> AsyncIterator[Sampler]:
    """Row ``key`` (one of :data:`HOSTED_ROWS`), set up in a new helper process."""
    early = "early" if HOSTED_ROWS[key] else "plain"
    document = json.dumps(attrs.asdict(settings))
    command = [sys.executable, "-c", _PROGRAM, _ROOT, early, key, document]
    async with await anyio.open_process(command, stderr=None) as helper:
        assert helper.stdin is not None
        assert helper.stdout is not None
        requests = helper.stdin
        replies = BufferedByteReceiveStream(helper.stdout)

        async def reply(request: bytes | None = None) -> bytes:
            try:
                if request is not None:
                    await requests.send(request)
                return await replies.receive_until(b"\n", 65536)
            except (anyio.BrokenResourceError, anyio.IncompleteRead):
                await helper.wait()
                raise RuntimeError(
                    f"the helper process of row {key!r} exited with status {helper.returncode}"
                ) from None

        first = await reply()
        if first.startswith(_UNAVAILABLE):
            raise Unavailable(first[len(_UNAVAILABLE) :].decode())
        if first != _READY:
            raise RuntimeError(f"the helper process of row {key!r} said {first!r}")

        async def sample() -> float:
            return float(await reply(b"sample\n"))

        yield sample
