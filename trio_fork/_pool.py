"""A load-balanced pool of RPC workers forked from one template: ``open_pool``, ``Pool``.

The trio_fork counterpart of AnyEvent::Fork::Pool. :mod:`._pool_state` decides; this
module does what it decides: it runs each worker in a task of the pool's task group
(a ``spawn`` block and the worker's connection), sends calls, closes workers, and
wakes up when a timer of the policy comes due.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
import attrs
import sniffio

from ._arguments import Serializer
from ._call import LOST, Call, Request, make_request, open_call, outcome, wait_for
from ._connection import Connection
from ._construct import NoPublicConstructor
from ._errors import BrokenWorkerError
from ._outofband import carries_fds
from ._placement import Placements
from ._pool_state import STARTING, Actions, Limits, PoolState, Slot
from ._rpc import EventQueue, is_async_function, prepare_worker, require_event_loop
from ._shared import DEFAULT_BUFFER_THRESHOLD, check_threshold
from ._transport import Transport
from .worker._rpc import WorkerSpec
from .worker._serializers import PICKLE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anyio.abc import TaskGroup

    from ._remote import RemoteTemplate
    from ._template import Template

    PoolTemplate = Template | RemoteTemplate | tuple[Template | RemoteTemplate, int]


@final
@attrs.frozen
class PoolStatistics:
    """A snapshot of a :class:`Pool`, from :meth:`Pool.statistics`.

    Attributes:
        workers: Worker processes, in any state.
        starting_workers: Workers forked but not yet ready.
        idle_workers: Ready workers without calls.
        busy_workers: Ready workers with at least one call.
        closing_workers: Workers told to exit (idle too long, retired, or replaced).
        queued_calls: Calls waiting in this process for a worker.
        running_calls: Calls sent to workers and not yet answered.
    """

    workers: int
    starting_workers: int
    idle_workers: int
    busy_workers: int
    closing_workers: int
    queued_calls: int
    running_calls: int


@final
@attrs.define(eq=False)
class Pool(metaclass=NoPublicConstructor):
    """Workers forked from one template, serving calls to one function.

    Made by :func:`open_pool`. Calls can be made from any number of tasks; each goes
    to the least loaded worker, or waits for one.
    """

    _state: PoolState
    _placements: Placements
    _spec: WorkerSpec
    _task_group: TaskGroup
    _event_loop_imported: bool
    _timer: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    _timer_deadline: float = math.inf
    _opening: set[Slot] = attrs.field(factory=set)
    _opened: anyio.Event = attrs.field(factory=anyio.Event)
    _open_error: BaseException | None = None
    _all_gone: anyio.Event = attrs.field(factory=anyio.Event)
    _now: Callable[[], float] = attrs.field(factory=lambda: event_loop_clock())
    _events: EventQueue = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        def connections() -> list[Connection]:
            return [slot.connection for slot in self._state.slots if slot.connection is not None]

        self._events = EventQueue(
            self._serializer, connections, lambda: self._state.closing and not self._state.slots
        )

    @property
    def _serializer(self) -> Serializer:
        serializer: Serializer = self._spec.serializer
        return serializer

    def __repr__(self) -> str:
        stats = self.statistics()
        return f"<trio_fork.Pool {stats.workers} workers, {stats.running_calls} calls running>"

    def statistics(self) -> PoolStatistics:
        """How many workers there are in each state, and how many calls."""
        return PoolStatistics(**self._state.statistics())

    async def call(self, *args: Any, kill_on_cancel: bool = False) -> Any:
        """Call the function with ``args`` in a worker; what it returns.

        Cancellation works as for :meth:`RPC.call`; a call still waiting for a
        worker is simply taken back. With ``kill_on_cancel``, the worker running a
        cancelled call is killed and replaced, and calls it had queued but not
        started go to other workers.

        Raises:
            RemoteError: The function raised; the remote traceback is attached.
            BrokenWorkerError: The worker died while running the call. A worker that
                dies is replaced; the pool stays usable.
            anyio.ClosedResourceError: The pool is closed.
        """
        request = make_request(self._serializer, args, kill_on_cancel, False, self._spec.buffers)
        self._submit(request)
        await wait_for(request, self._withdraw)
        return outcome(request, self._serializer)

    @asynccontextmanager
    async def open_call(self, *args: Any, kill_on_cancel: bool = False) -> AsyncIterator[Call]:
        """Start a call, and receive its events while it runs (see :meth:`RPC.open_call`)."""
        request = make_request(self._serializer, args, kill_on_cancel, True, self._spec.buffers)
        self._submit(request)
        async with open_call(request, self._serializer, self._withdraw) as call:
            yield call

    def events(self) -> AsyncIterator[Any]:
        """The events that workers send outside calls, from any worker, as they come.

        As :meth:`RPC.events`, for every worker of the pool; the iteration ends once
        the pool is closed and its workers are gone.
        """
        return self._events

    def _submit(self, request: Request) -> None:
        if self._state.closing:
            raise anyio.ClosedResourceError("the pool is closed")
        self._apply(self._state.submit(request, self._now()))

    def _withdraw(self, request: Request) -> bool:
        return self._state.withdraw(request)

    def _apply(self, actions: Actions) -> None:
        """Do what the policy decided: the only place where its decisions meet I/O."""
        for slot in actions.start:
            if not self._opened.is_set():
                # Started while the pool opens (a replacement): open waits for it too.
                self._opening.add(slot)
            self._task_group.start_soon(self._run_worker, slot)
        for slot, request in actions.send:
            assert slot.connection is not None
            slot.connection.send(request)
        for slot in actions.close:
            assert slot.connection is not None
            slot.connection.close_write()
        for request, error in actions.fail:
            request.finish(LOST, error)
        if not self._state.slots and self._state.closing:
            self._all_gone.set()
            self._events.changed()
        # A finite timer deadline is the earliest one known; later changes can only
        # move deadlines later, except for a start the policy put off (flagged).
        if actions.timer or self._timer_deadline == math.inf:
            deadline = self._state.next_deadline()
            if deadline < self._timer_deadline:
                # Moved, not woken: no task switch on the path of every call.
                self._timer_deadline = self._timer.deadline = deadline

    async def _run_timer(self) -> None:
        while True:
            self._timer_deadline = deadline = self._state.next_deadline()
            with anyio.CancelScope(deadline=deadline) as self._timer:
                await anyio.sleep_forever()
            self._apply(self._state.tick(self._now()))

    async def _open(self) -> None:
        """Start the ``idle`` workers and wait until they are ready."""
        actions = self._state.open(self._now())
        self._opening.update(actions.start)
        if not self._opening:
            self._opened.set()
        self._apply(actions)
        await self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    async def _close(self) -> None:
        """Let the calls already made finish, then end the workers."""
        self._apply(self._state.close(self._now()))
        await self._all_gone.wait()

    def _abandon(self) -> None:
        """The pool is going away at once: calls still queued fail."""
        self._apply(self._state.abandon(anyio.ClosedResourceError("the pool was closed")))

    async def _run_worker(self, slot: Slot) -> None:
        error: BaseException | None = None
        died = False
        index = await self._placements.take()
        template = self._placements.templates[index]
        try:
            async with template._spawn_worker(self._spec) as (process, sock):
                connection = Connection(
                    process, Transport(sock), buffers=self._spec.buffers is not None
                )
                connection.on_event = self._events.put
                self._state.worker_started(slot, connection)
                self._events.changed()  # one more socket to read for events
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(connection.run)
                    await connection.wait_ready()
                    if connection.failure is not None:
                        error = connection.failure
                    elif connection.lost is not None:
                        error = BrokenWorkerError(f"{connection.lost} before it was ready")
                        died = True
                    if error is not None:
                        task_group.cancel_scope.cancel()
                    else:
                        if connection.concurrent and not self._event_loop_imported:
                            # Learnt only now (the function was named by a string):
                            # later workers start faster if the template has it.
                            self._event_loop_imported = True
                            for each in self._placements.templates:
                                await require_event_loop(each)
                        self._serve(slot, connection)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if slot.status != STARTING:
                # It served, and its loss has been dealt with; the spawn block only
                # found, on the way out, what the connection found first (say, the
                # template died with the worker's exit status).
                return
            error = exc
        finally:
            self._placements.release(index)
        if error is not None:
            self._failed(slot, error, died=died)

    def _serve(self, slot: Slot, connection: Connection) -> None:
        """The worker is ready: hook its connection up to the policy."""

        def finished(connection: Connection, request: Request) -> None:
            if connection.lost is not None:
                # Its loss is reported once, below, when every request is settled.
                self._state.call_lost(slot)
                return
            self._apply(self._state.call_finished(slot, self._now()))

        def lost(connection: Connection) -> None:
            self._apply(self._state.worker_gone(slot, self._now()))
            self._events.changed()

        def retiring(connection: Connection) -> None:
            self._apply(self._state.worker_retiring(slot, self._now()))

        connection.on_finished = finished
        connection.requeue = self._state.requeue
        connection.on_lost = lost
        connection.on_retiring = retiring
        self._opened_one(slot, None)
        self._apply(self._state.worker_ready(slot, self._now()))

    def _failed(self, slot: Slot, error: BaseException, *, died: bool) -> None:
        """A worker could not start: it said why (``init`` raised, say), or it died."""
        if died:
            actions = self._state.worker_died_starting(slot, error, self._now())
            replaced = not self._state.start_failed
        else:
            actions = self._state.worker_failed(slot, error, self._now())
            replaced = False
        # Its replacement, if any, joins those that the opening waits for first.
        self._apply(actions)
        self._opened_one(slot, None if replaced else error)

    def _opened_one(self, slot: Slot, error: BaseException | None) -> None:
        if slot in self._opening:
            self._opening.discard(slot)
            if error is not None and self._open_error is None:
                self._open_error = error
            if not self._opening:
                self._opened.set()


@asynccontextmanager
async def open_pool(
    template: Template | RemoteTemplate | Sequence[PoolTemplate],
    function: str | Callable[..., Any],
    *,
    max: int | None = None,
    idle: int = 0,
    load: int = 1,
    start: float = 0.1,
    stop: float = 10.0,
    retire: int | None = None,
    init: str | Callable[..., Any] | None = None,
    init_args: Iterable[Any] = (),
    serializer: Serializer | object = PICKLE,
    events: bool = False,
    done: str | Callable[..., Any] | None = None,
    buffer_threshold: int | None = DEFAULT_BUFFER_THRESHOLD,
) -> AsyncIterator[Pool]:
    """A pool of workers forked from ``template``, serving calls to ``function``.

    Workers are RPC workers, as from :func:`open_rpc`, started and stopped as load
    demands. Leaving the block lets the calls already made finish, then ends the
    workers; leaving it by an exception or cancellation kills them.

    Args:
        template: The template to fork workers from, local or remote; or a sequence
            of templates, or of ``(template, max)`` pairs, to spread the workers
            over (say, over several hosts). A new worker is forked from the template
            with the fewest workers for its ``max``.
        function: As for :func:`open_rpc`.
        max: The most workers at once (default: the number of CPUs); with a
            sequence of templates, the most of each template that is not given
            its own, and the pool's most is their sum.
        idle: Workers kept even without calls; the block starts with this many ready.
        load: Calls sent to one worker at a time; beyond that, calls wait here for
            a worker. For a sync function, more than one lets a worker start its
            next call without waiting for this process, but a call queued in a
            worker can only be cancelled once the worker gets to it.
        start: Seconds between starting one worker and the next when calls wait
            (the first is started at once).
        stop: Seconds a worker beyond ``idle`` may go without calls before it is
            closed (``math.inf``: never).
        retire: Calls after which a worker is replaced (default: never). A worker
            may also ask to be replaced, with :func:`trio_fork.worker.retire`.
        init, init_args, serializer, events, done, buffer_threshold: As for :func:`open_rpc`.

    Raises:
        RemoteError: The function or ``init`` could not be found in the first
            workers, or ``init`` raised.
    """
    if max is not None:
        _check_int("max", max, 1)
    placements = Placements.of(template, max if max is not None else os.cpu_count() or 1)
    limits = _limits(placements.total, idle, load, start, stop, retire)
    threshold = check_threshold(buffer_threshold, "open_pool")
    if not all(carries_fds(each) for each in placements.templates):
        threshold = None
    for each in placements.templates:
        spec = await prepare_worker(
            each,
            function,
            init=init,
            init_args=init_args,
            serializer=serializer,
            events=events,
            done=done,
            # Out of band only if every template's workers can take descriptors.
            buffer_threshold=threshold,
            where="open_pool",
        )
    async with run_pool(placements, limits, spec) as pool:
        yield pool


@asynccontextmanager
async def run_pool(placements: Placements, limits: Limits, spec: WorkerSpec) -> AsyncIterator[Pool]:
    """The lifetime of a pool whose template is ready and settings checked."""
    body_error: BaseException | None = None
    timer = anyio.CancelScope()
    async with anyio.create_task_group() as task_group:
        pool = Pool._create(
            PoolState(limits), placements, spec, task_group, is_async_function(spec.function)
        )
        task_group.start_soon(_run_in, timer, pool._run_timer)
        try:
            await pool._open()
            yield pool
            await pool._close()
        except BaseException as exc:
            # Raised again below, outside the task group, so that it reaches the
            # caller as itself rather than inside an exception group.
            body_error = exc
            pool._abandon()
            task_group.cancel_scope.cancel()
        timer.cancel()
    if body_error is not None:
        raise body_error


async def _run_in(scope: anyio.CancelScope, function: Callable[[], Awaitable[object]]) -> None:
    with scope:
        await function()


def event_loop_clock() -> Callable[[], float]:
    """The running event loop's clock, as a plain function.

    The clock of :func:`anyio.current_time` (which deadlines use), without looking
    up the backend on every call: the pool reads it for every call it handles.
    """
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.current_time
    import asyncio

    return asyncio.get_running_loop().time


def _limits(
    max: int | None, idle: int, load: int, start: float, stop: float, retire: int | None
) -> Limits:
    if max is None:
        max = os.cpu_count() or 1
    _check_int("max", max, 1)
    _check_int("idle", idle, 0)
    _check_int("load", load, 1)
    if retire is not None:
        _check_int("retire", retire, 1)
    if idle > max:
        raise ValueError(f"idle ({idle}) cannot exceed max ({max})")
    return Limits(max, idle, load, _seconds("start", start), _seconds("stop", stop), retire)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, not {value!r}")
    try:
        return float(value)
    except OverflowError:
        return math.inf  # an int beyond any float: forever, as far as any clock goes


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}")
