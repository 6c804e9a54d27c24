"""run_sync workers forked from templates of the caller's, local or remote.

A worker context normally forks its workers from a template of its own that outlives
event loops (:mod:`._workers`). Given templates instead (``open_worker_context(
template=...)``), say remote ones, so that ``run_sync`` calls run on other hosts, it
forks them from those: templates that belong to the event loop that opened them, as
does the pool of RPC workers (:mod:`._pool`) that serves the calls here. Each worker
serves :func:`~trio_fork.worker._apply.apply`, as run_sync's own workers do, so a
call's function travels pickled by reference, and a remote host lacking its module
gets it by import forwarding. The pool spreads the workers over the templates, each
with its own most.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ._call import Request, outcome, wait_for
from ._context_settings import Settings
from ._main_module import refers_to_main
from ._outofband import Descriptors, carries_fds
from ._placement import Placements
from ._pool import Pool, run_pool
from ._pool_state import Limits
from ._rpc import prepare_template
from ._spawn import current_event_loop
from .worker._apply import Pickled

if TYPE_CHECKING:
    from ._pool import PoolTemplate
    from ._remote import RemoteTemplate
    from ._template import Template

    GivenTemplates = Template | RemoteTemplate | Sequence[PoolTemplate]


@attrs.define(eq=False)
class TemplateWorkers:
    """The workers of a context over the caller's templates: a pool serving ``apply``."""

    _pool: Pool
    _shares_main: bool
    _loop: object = attrs.field(factory=current_event_loop)
    _running: int = 0
    # Set when the last running call is done, for a close that waits for them.
    _drained: anyio.Event | None = None

    @property
    def buffers(self) -> bool:
        """Whether calls' buffers may go out of band (every template takes descriptors)."""
        return self._pool._spec.buffers is not None

    def statistics(self) -> tuple[int, int]:
        """Idle workers, and workers running calls."""
        stats = self._pool.statistics()
        return stats.idle_workers, stats.busy_workers

    def check_call(self, fn: object, args: tuple[Any, ...], payload: bytes) -> None:
        """Refuse, before it is sent, a call these workers cannot run.

        Raises:
            RuntimeError: Called from another event loop than the one that opened
                the context (its templates belong to that one).
            TypeError: It refers to this program's ``__main__``, which the templates
                do not have.
        """
        if current_event_loop() is not self._loop:
            raise RuntimeError(
                "a worker context over templates belongs to the event loop that opened "
                "it, as its templates do: it cannot be used from another event loop or "
                "thread (from a worker thread of that event loop, use anyio.from_thread.run)"
            )
        if not self._shares_main and b"__main__" in payload and refers_to_main((fn, args)):
            raise TypeError(_no_main(fn))

    async def call(self, payload: bytes, fds: Descriptors | None, kill_on_cancel: bool) -> Any:
        """One run_sync call, as :func:`run_sync` promises it; its result."""
        request = Request(payload, kill_on_cancel, fds)
        pool = self._pool
        pool._submit(request)
        self._running += 1
        try:
            await wait_for(request, pool._withdraw)
        finally:
            self._running -= 1
            if not self._running and self._drained is not None:
                self._drained.set()
        return outcome(request, Pickled, originals=True)

    async def drain(self) -> None:
        """Wait until no call is running (resumable, for :func:`~._call.shielded`)."""
        if self._running:
            self._drained = anyio.Event()
            await self._drained.wait()


@asynccontextmanager
async def open_template_workers(
    given: GivenTemplates, settings: Settings
) -> AsyncIterator[TemplateWorkers]:
    """Workers of ``settings`` forked from ``given``; ended (``grace_period``) on exit.

    Raises:
        TypeError, ValueError: ``given`` is not a template nor a sequence of them, or
            ``init`` or ``retire`` refer to this program's ``__main__``, which the
            templates do not have.
        RemoteError: A preloaded module failed to import in a template.
    """
    placements = Placements.of(given, os.cpu_count() or 1)
    shares_main = all(template.shares_main for template in placements.templates)
    hooks = (settings.init, settings.retire)
    if not shares_main and refers_to_main(hooks):
        raise TypeError(_no_main(next(hook for hook in hooks if refers_to_main(hook))))
    for template in placements.templates:
        if settings.preload:
            await template.require(*settings.preload)
        await prepare_template(template, False)
        await template.require("trio_fork.worker._apply")
    spec = settings.spec()
    if not all(carries_fds(template) for template in placements.templates):
        spec = spec._replace(buffers=None)
    # No worker kept idle beyond idle_timeout; one call per worker at a time; a new
    # worker as soon as a call waits (run_sync's limiter bounds how many there are).
    limits = Limits(placements.total, 0, 1, 0.0, settings.idle_timeout, settings.retire_calls)
    # Leaving lets the calls running finish; then the workers get the grace period
    # to exit (end of file), after which the pool's cancellation kills them.
    with anyio.CancelScope() as grace:
        async with run_pool(placements, limits, spec) as pool:
            try:
                yield TemplateWorkers(pool, shares_main)
            finally:
                period = settings.grace_period
                grace.deadline = anyio.current_time() + period if period < math.inf else math.inf


def _no_main(fn: object) -> str:
    return (
        f"{fn!r} is defined in this program's __main__, which the templates of this "
        "worker context do not have: define it in a module (imported there, or forwarded "
        "to a remote template)"
    )
