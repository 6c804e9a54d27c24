"""RPC to a function running in a child: ``open_rpc`` and ``RPC``.

The trio_fork counterpart of AnyEvent::Fork::RPC. A child forked from a template
serves calls to one function (:mod:`trio_fork.worker._rpc`); the parent sends
arguments and receives results, errors (with the remote traceback) and events, over
the child's socket, through a :class:`~trio_fork._connection.Connection`. Events sent
outside calls (:func:`trio_fork.worker.emit`) wait in :class:`EventQueue` until taken.
"""

from __future__ import annotations

import inspect
import pickle
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
import anyio.lowlevel
import attrs
import sniffio

from ._arguments import Serializer, check_reference, check_serializer
from ._call import Call, Request, make_request, open_call, outcome, wait_for, wait_until
from ._connection import Connection
from ._construct import NoPublicConstructor
from ._errors import BrokenWorkerError
from ._transport import Transport
from .worker._rpc import WorkerSpec
from .worker._serializers import PICKLE

if TYPE_CHECKING:
    from ._remote import RemoteTemplate
    from ._template import Template


async def prepare_template(template: Template | RemoteTemplate, concurrent: bool) -> None:
    """Make ``template`` fork RPC workers fast: the worker loop imported, once for all."""
    await template.require("trio_fork.worker._rpc")
    if concurrent:
        await require_event_loop(template)


async def require_event_loop(template: Template | RemoteTemplate) -> None:
    """Import what an async worker's event loop needs into ``template``, once for all."""
    await template.require(f"anyio._backends._{sniffio.current_async_library()}")


def worker_spec(
    function: str | Callable[..., Any],
    *,
    init: str | Callable[..., Any] | None,
    init_args: Iterable[Any],
    serializer: object,
    events: bool,
    exceptions: bool,
    retire: str | Callable[..., Any] | None = None,
    done: str | Callable[..., Any] | None = None,
) -> WorkerSpec:
    """What RPC workers of ``function`` are spawned with, checked here so errors are clear."""
    if isinstance(init_args, (str, bytes)):
        raise TypeError(f"init_args: expected a sequence of arguments, got {init_args!r}")
    spec = WorkerSpec(
        check_reference(function, "function"),
        None if init is None else check_reference(init, "init"),
        tuple(init_args),
        check_serializer(serializer),
        bool(events),
        exceptions,
        sniffio.current_async_library(),
        retire,
        None if done is None else check_reference(done, "done"),
    )
    try:
        pickle.dumps(spec.init_args, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"init_args cannot be sent to a worker: {exc}") from exc
    return spec


async def prepare_worker(
    template: Template | RemoteTemplate,
    function: str | Callable[..., Any],
    *,
    init: str | Callable[..., Any] | None,
    init_args: Iterable[Any],
    serializer: Serializer | object,
    events: bool,
    done: str | Callable[..., Any] | None,
) -> WorkerSpec:
    """Check the settings of workers of ``function``; make ``template`` able to fork them."""
    spec = worker_spec(
        function,
        init=init,
        init_args=init_args,
        serializer=serializer,
        events=events,
        exceptions=False,
        done=done,
    )
    await prepare_template(template, is_async_function(function))
    return spec


def is_async_function(function: str | Callable[..., Any]) -> bool:
    """Whether ``function`` is known here to be async (a string is resolved only there)."""
    return not isinstance(function, str) and inspect.iscoroutinefunction(function)


@attrs.define(eq=False)
class EventQueue:
    """Events that workers sent outside calls, kept in order until they are taken.

    Taking one reads the workers' sockets when it is this task's turn (see
    :mod:`._connection`): on trio nothing else may be reading an idle worker's.
    ``watched`` gives the connections to read; :meth:`changed` says that they (or
    whether the iteration is over) changed.
    """

    _serializer: Serializer
    _watched: Callable[[], list[Connection]]
    _over: Callable[[], bool]
    _queue: deque[bytes] = attrs.field(factory=deque)
    _waiters: set[Request] = attrs.field(factory=set)
    _changes: int = 0

    def put(self, payload: bytes) -> None:
        self._queue.append(payload)
        self._wake()

    def changed(self, *_: object) -> None:
        self._changes += 1
        self._wake()

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            waiter.wake()

    def __aiter__(self) -> EventQueue:
        return self

    async def __anext__(self) -> Any:
        queue = self._queue
        while True:
            while not queue:
                if self._over():
                    raise StopAsyncIteration
                await self._wait(self._changes)
            await anyio.lowlevel.checkpoint()
            if queue:  # else another task took it meanwhile
                return self._serializer.loads(queue.popleft())

    async def _wait(self, changes: int) -> None:
        """Wait for an event or a change, reading every watched worker's socket."""

        def taken_or_changed() -> bool:
            return bool(self._queue) or self._changes != changes

        watched = [connection for connection in self._watched() if connection.readable]
        if len(watched) <= 1:
            await self._listen(watched[0] if watched else None, taken_or_changed)
            return
        async with anyio.create_task_group() as task_group:
            for connection in watched:
                task_group.start_soon(
                    self._listen, connection, taken_or_changed, task_group.cancel_scope
                )

    async def _listen(
        self,
        connection: Connection | None,
        condition: Callable[[], bool],
        scope: anyio.CancelScope | None = None,
    ) -> None:
        """Wait for ``condition``, reading ``connection`` when it is our turn."""
        waiter = Request(b"", False)
        waiter.connection = connection
        self._waiters.add(waiter)
        try:
            await wait_until(
                waiter,
                lambda: condition() or (connection is not None and not connection.readable),
            )
        finally:
            self._waiters.discard(waiter)
        if scope is not None:
            scope.cancel()


@final
@attrs.define(eq=False)
class RPC(metaclass=NoPublicConstructor):
    """Calls to one function in one worker process.

    Made by :func:`open_rpc`. Calls can be made from many tasks at once: a sync
    function's worker runs them one after the other in the order they were made, an
    async function's worker runs them all concurrently.
    """

    _connection: Connection
    _serializer: Serializer
    _events: EventQueue

    def __repr__(self) -> str:
        return f"<trio_fork.RPC worker {self.pid}>"

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._connection.pid

    @property
    def concurrent(self) -> bool:
        """Whether the worker runs calls concurrently (its function is ``async``)."""
        return self._connection.concurrent

    async def call(self, *args: Any, kill_on_cancel: bool = False) -> Any:
        """Call the function with ``args`` in the worker; what it returns.

        Events the function sends are dropped; use :meth:`open_call` to receive them.

        If the call is cancelled, it is stopped in the worker before the
        cancellation is raised: a call that has not started is dropped; a running
        call of an async worker is cancelled there; a running call of a sync worker
        cannot be interrupted, so the caller waits for it and it returns normally
        (the cancellation takes effect at the next checkpoint). With
        ``kill_on_cancel``, a cancelled running call kills the worker instead; the
        other calls it was running fail with :exc:`BrokenWorkerError`.

        Raises:
            RemoteError: The function raised; the remote traceback is attached.
            BrokenWorkerError: The worker died before it answered.
            TypeError: The arguments cannot be serialized.
        """
        request = make_request(self._serializer, args, kill_on_cancel, listen=False)
        self._send(request)
        await wait_for(request)
        return outcome(request, self._serializer)

    @asynccontextmanager
    async def open_call(self, *args: Any, kill_on_cancel: bool = False) -> AsyncIterator[Call]:
        """Start a call, and receive its events while it runs.

        Leaving the block normally waits for the call to finish and raises its
        error, if :meth:`Call.result` did not; leaving it early stops the call as a
        cancelled :meth:`call` would be stopped.
        """
        request = make_request(self._serializer, args, kill_on_cancel, listen=True)
        self._send(request)
        async with open_call(request, self._serializer, None) as call:
            yield call

    def events(self) -> AsyncIterator[Any]:
        """The events the worker sends outside calls, as they come.

        AnyEvent::Fork::RPC's ``on_event``: ``async for event in rpc.events():``
        receives what the worker passes to :func:`trio_fork.worker.emit` (from
        ``init``, a thread of its own, or a call), in order, deserialized as results
        are. Events are kept from the worker's start until taken, by any number of
        iterators (each event goes to one). The iteration ends once the worker has
        exited and every event it sent has been taken. Events a call sends to its
        own ``emit`` go to that call's :class:`Call`, not here.

        Raises:
            TypeError, ValueError, ...: What the serializer raises for an event that
                does not deserialize (the iteration can go on).
        """
        return self._events

    def _send(self, request: Request) -> None:
        self._connection.send(request)


@asynccontextmanager
async def open_rpc(
    template: Template | RemoteTemplate,
    function: str | Callable[..., Any],
    *,
    init: str | Callable[..., Any] | None = None,
    init_args: Iterable[Any] = (),
    serializer: Serializer | object = PICKLE,
    events: bool = False,
    done: str | Callable[..., Any] | None = None,
) -> AsyncIterator[RPC]:
    """Fork a worker from ``template`` that serves calls to ``function``.

    A plain function is served one call at a time. An ``async def`` function is
    served by an event loop in the worker (on this process's backend), and calls run
    concurrently. Leaving the block waits for the calls still running, then ends the
    worker; leaving it by an exception or cancellation kills the worker.

    Args:
        template: The template to fork the worker from.
        function: ``"package.module:qualname"``, or a function defined at the top
            level of a module; ``"__main__:name"`` is found in the template's
            ``__main__``.
        init: A function (same forms) called once in the worker with ``init_args``
            before it serves calls; it may be ``async`` if ``function`` is.
        init_args: Arguments for ``init``, sent pickled.
        serializer: How arguments, results and events travel: :data:`PICKLE`
            (the default), :data:`JSON`, or any :class:`Serializer`.
        events: Pass the function an ``emit`` callable as its first argument; each
            ``emit(event)`` (``await emit(event)`` when async) sends an event to
            :meth:`RPC.open_call`'s :class:`Call`.
        done: A function (same forms), AnyEvent::Fork::RPC's ``done``: called in the
            worker with no arguments when it ends as it was asked to (this block
            closed it, or it retired), after its last call and before it exits; it
            may be ``async`` if ``function`` is. Without it the worker simply exits,
            and a worker's ``atexit`` handlers never run: flush and clean up here.

    Raises:
        RemoteError: The function or ``init`` could not be found, or ``init`` raised.
        BrokenWorkerError: The worker died before it was ready.
    """
    spec = await prepare_worker(
        template,
        function,
        init=init,
        init_args=init_args,
        serializer=serializer,
        events=events,
        done=done,
    )
    async with template._spawn_worker(spec) as (process, sock):
        connection = Connection(process, Transport(sock))
        queue = EventQueue(spec.serializer, lambda: [connection], lambda: not connection.readable)
        connection.on_event = queue.put
        connection.on_lost = queue.changed
        body_error: BaseException | None = None
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(connection.run)
            try:
                await connection.wait_ready()
                if connection.failure is not None:
                    raise connection.failure
                if connection.lost is not None:
                    raise BrokenWorkerError(f"{connection.lost} before it was ready")
                try:
                    yield RPC._create(connection, spec.serializer, queue)
                finally:
                    connection.closing = True
                await connection.wait_idle()
                connection.close_write()
            except BaseException as exc:
                # Raised again below, outside the task group, so that it reaches the
                # caller as itself rather than inside an exception group.
                body_error = exc
                task_group.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
