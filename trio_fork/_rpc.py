"""RPC to a function running in a child: ``open_rpc`` and ``RPC``.

The trio_fork counterpart of AnyEvent::Fork::RPC. A child forked from a template
serves calls to one function (:mod:`trio_fork.worker._rpc`); the parent sends
arguments and receives results, errors (with the remote traceback) and events, over
the child's socket, through a :class:`~trio_fork._connection.Connection`.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
import attrs
import sniffio

from ._arguments import Serializer, check_reference, check_serializer
from ._call import Call, Request, make_request, open_call, outcome, wait_for
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
) -> WorkerSpec:
    """Check the settings of workers of ``function``; make ``template`` able to fork them."""
    spec = worker_spec(
        function,
        init=init,
        init_args=init_args,
        serializer=serializer,
        events=events,
        exceptions=False,
    )
    await prepare_template(template, is_async_function(function))
    return spec


def is_async_function(function: str | Callable[..., Any]) -> bool:
    """Whether ``function`` is known here to be async (a string is resolved only there)."""
    return not isinstance(function, str) and inspect.iscoroutinefunction(function)


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

    Raises:
        RemoteError: The function or ``init`` could not be found, or ``init`` raised.
        BrokenWorkerError: The worker died before it was ready.
    """
    spec = await prepare_worker(
        template, function, init=init, init_args=init_args, serializer=serializer, events=events
    )
    async with template._spawn_worker(spec) as (process, sock):
        connection = Connection(process, Transport(sock))
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
                    yield RPC._create(connection, spec.serializer)
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
