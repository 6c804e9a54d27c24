"""The rows of the ``fork_template`` test fixture, against a fixture of a fresh template.

What is timed is what the test process runs for the fixture, without pytest's own
bookkeeping: ``fork_template`` is :func:`~trio_fork._isolated.open_isolated_template`
on the session's template handle, entered and left; the fixture it replaces is
``open_template()`` entered and left, an interpreter started for every test. Both
are measured with no preload (the plugin's default) and with the imports of a
typical test suite, which a fresh template pays for in every test and a fork does
not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from .._handle import start_template
from .._isolated import open_isolated_template
from .._open import open_template
from ._measure import Sampler, entered_and_left, median_latency

if TYPE_CHECKING:
    from ._report import Settings

SUITE_PRELOAD = ("anyio", "trio", "json", "decimal", "email.message", "http.client")
"""What a test suite's session template might import: an async stack and some of the
standard library."""


@asynccontextmanager
async def fork_template_fixture(
    settings: Settings, preload: Sequence[str]
) -> AsyncIterator[Sampler]:
    """Set-up and teardown of ``fork_template``, the session's template already running."""
    # start_template() and the handle's close() block the event loop for a moment,
    # here in the untimed set-up. Run in a worker thread instead, they would leave
    # this process with threads, and the os.fork() rows fork this process.
    with start_template(preload=preload) as handle:
        once = entered_and_left(lambda: open_isolated_template(handle, []))

        async def sample() -> float:
            return await median_latency(once, settings.sample_seconds)

        await once()
        yield sample


@asynccontextmanager
async def fresh_template_fixture(
    settings: Settings, preload: Sequence[str], *, fresh: bool = True
) -> AsyncIterator[Sampler]:
    """Set-up and teardown of a fixture that opens a template of its own per test.

    That is ``open_template(fresh=True)`` entered and left: an interpreter started for
    each test. The ``open_template`` rows also time it, in helper processes (see
    ``_helper``), and with ``fresh=False`` what ``open_template()`` forks there.
    """
    once = entered_and_left(lambda: open_template(preload, fresh=fresh))

    async def sample() -> float:
        return await median_latency(once, settings.sample_seconds)

    await once()
    yield sample
