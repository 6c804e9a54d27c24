"""RPC to a function running in a child: ``open_rpc``, ``RPC`` and ``Call``.

The trio_fork counterpart of AnyEvent::Fork::RPC. A child forked from a template
serves calls to one function; the parent sends arguments and receives results,
errors (with the remote traceback) and events, over the child's socket.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
import anyio.lowlevel
import attrs
import sniffio
from anyio.abc import SocketAttribute

from . import _rpc_worker
from ._errors import BrokenWorkerError
from ._rpc_connection import LOST, Connection, Request, unwrap_error, wait_until
from ._rpc_wire import CANCELLED, ERROR, RESULT
from ._serializers import PICKLE, Serializer, check_serializer
from ._template import check_name

if TYPE_CHECKING:
    from ._template import Template

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# The standard-library-only modules an RPC worker runs, loaded into a template by
# file (as the template's own bootstrap loads its modules) so that the template
# never imports the trio_fork package, and with it trio and anyio.
_WORKER_MODULES = ("_rpc_wire", "_serializers", "_rpc_worker")
_LOADER = """\
def _trio_fork_load(package_dir, names):
    import importlib.util, sys
    for name in names:
        full_name = "trio_fork." + name
        if full_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full_name, f"{package_dir}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full_name]
            raise
_trio_fork_load(*args)
del _trio_fork_load
"""

Withdraw = Callable[[Request], bool]
"""Takes back a request that was never sent; False if it is no longer waiting."""


async def prepare_template(template: Template, concurrent: bool) -> None:
    """Make ``template`` able to fork RPC workers (and fast for async ones)."""
    await template.eval(_LOADER, _PACKAGE_DIR, list(_WORKER_MODULES))
    if concurrent:
        await require_event_loop(template)


async def require_event_loop(template: Template) -> None:
    """Import what an async worker's event loop needs into ``template``, once for all."""
    await template.require(f"anyio._backends._{sniffio.current_async_library()}")


def worker_options(
    function: str | Callable[..., Any],
    *,
    init: str | Callable[..., Any] | None,
    init_args: Iterable[Any],
    serializer: object,
    events: bool,
    exceptions: bool,
) -> dict[str, Any]:
    """The options an RPC worker is spawned with, checked here so errors are clear."""
    if isinstance(init_args, (str, bytes)):
        raise TypeError(f"init_args: expected a sequence of arguments, got {init_args!r}")
    options = {
        "function": check_reference(function, "function"),
        "init": None if init is None else check_reference(init, "init"),
        "init_args": tuple(init_args),
        "serializer": check_serializer(serializer),
        "events": bool(events),
        "exceptions": exceptions,
        "backend": sniffio.current_async_library(),
    }
    try:
        pickle.dumps(options["init_args"], pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"init_args cannot be sent to a worker: {exc}") from exc
    return options


def pickle_options(options: dict[str, Any]) -> bytes:
    """The options as the worker takes them (see ``_rpc_worker._Unpickler``)."""
    return pickle.dumps(options, pickle.HIGHEST_PROTOCOL)


async def prepare_worker(
    template: Template,
    function: str | Callable[..., Any],
    *,
    init: str | Callable[..., Any] | None,
    init_args: Iterable[Any],
    serializer: Serializer | object,
    events: bool,
) -> dict[str, Any]:
    """Check the settings of workers of ``function``; make ``template`` able to fork them."""
    options = worker_options(
        function,
        init=init,
        init_args=init_args,
        serializer=serializer,
        events=events,
        exceptions=False,
    )
    await prepare_template(template, is_async_function(function))
    return options


def is_async_function(function: str | Callable[..., Any]) -> bool:
    """Whether ``function`` is known here to be async (a string is resolved only there)."""
    return not isinstance(function, str) and inspect.iscoroutinefunction(function)


def check_reference(obj: object, what: str) -> str | Callable[..., Any]:
    if isinstance(obj, str):
        return check_name(obj, what)
    if not callable(obj):
        raise TypeError(
            f"{what} must be a 'module:qualname' string or a callable, not {type(obj).__name__}"
        )
    try:
        pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"{what} {obj!r} cannot be found by name in another process ({exc}): pass a "
            "function defined at the top level of a module, or a 'module:qualname' string"
        ) from exc
    return obj


def make_request(
    serializer: Serializer, args: tuple[Any, ...], kill_on_cancel: bool, listen: bool
) -> Request:
    """A request for a call with ``args``, serialized here so that errors are ours."""
    try:
        payload = serializer.dumps(args)
    except Exception as exc:
        raise TypeError(f"the arguments of the call cannot be serialized: {exc}") from exc
    request = Request(payload, kill_on_cancel)
    if listen:
        request.events = deque()
    return request


async def wait_for(request: Request, withdraw: Withdraw | None = None) -> None:
    """Wait for a request's outcome; if cancelled, stop the call exactly first.

    The cancellation is raised if the call was stopped (or never ran); a call that
    finished before it could be stopped keeps its outcome, and the cancellation
    takes effect at the caller's next checkpoint, as with any operation that
    completed.
    """
    try:
        await wait_until(request, lambda: request.done)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await abort(request, withdraw, kill=request.kill_on_cancel)
        if request.kind not in (RESULT, ERROR):
            raise
    except BaseException:
        # KeyboardInterrupt and the like: nothing is known, so nothing is kept.
        with anyio.CancelScope(shield=True):
            await abort(request, withdraw, kill=True)
        raise


async def abort(request: Request, withdraw: Withdraw | None, *, kill: bool) -> None:
    """Stop a request and wait until the worker's state is known again."""
    if request.done:
        return
    request.cancelling = True
    connection = request.connection
    if connection is None:
        if withdraw is not None and withdraw(request):
            request.finish(CANCELLED, None)
            return
    elif kill and connection.is_running(request):
        connection.kill()
    else:
        connection.cancel(request)
    await wait_until(request, lambda: request.done)


def outcome(request: Request, serializer: Serializer, originals: bool = False) -> Any:
    """The result of a finished request, or raise its error."""
    if request.kind == RESULT:
        return serializer.loads(request.value)
    if request.kind == ERROR:
        raise unwrap_error(request.value, originals)
    if request.kind == LOST:
        # BrokenWorkerError, or why no worker could take the call.
        error: BaseException = request.value
        raise error
    raise RuntimeError("the call was cancelled")  # pragma: no cover - callers re-raise first


@final
@attrs.define(eq=False, init=False)
class Call:
    """A call in progress, with the events its function sends.

    Made by :meth:`RPC.open_call` and :meth:`Pool.open_call`. Iterate over it to
    receive the events, in the order they were sent; the iteration ends when the
    call has finished. Events that arrive before you iterate are kept for you.
    """

    _request: Request
    _serializer: Serializer
    _withdraw: Withdraw | None
    _taken: bool

    @classmethod
    def _create(cls, request: Request, serializer: Serializer, withdraw: Withdraw | None) -> Call:
        self = cls.__new__(cls)
        self._request = request
        self._serializer = serializer
        self._withdraw = withdraw
        self._taken = False
        return self

    def __repr__(self) -> str:
        return f"<trio_fork.Call {'finished' if self.done else 'running'}>"

    @property
    def done(self) -> bool:
        """Whether the call has finished (its events may still be waiting to be read)."""
        return self._request.done

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> Any:
        request = self._request
        assert request.events is not None
        events = request.events
        await wait_until(request, lambda: bool(events) or request.done)
        await anyio.lowlevel.checkpoint()
        if not events:
            raise StopAsyncIteration
        return self._serializer.loads(events.popleft())

    async def result(self) -> Any:
        """Wait for the call to finish; its result.

        Cancelling this wait cancels the call, as for :meth:`RPC.call`.

        Raises:
            RemoteError: The function raised.
            BrokenWorkerError: The worker died before it answered.
        """
        await wait_for(self._request, self._withdraw)
        self._taken = True
        return outcome(self._request, self._serializer)

    async def _finish(self) -> None:
        if not self._taken:
            await self.result()


@asynccontextmanager
async def open_call(
    request: Request, serializer: Serializer, withdraw: Withdraw | None
) -> AsyncIterator[Call]:
    """The body of ``open_call`` for RPCs and pools: a handle, then an exact ending."""
    call = Call._create(request, serializer, withdraw)
    try:
        yield call
    except BaseException:
        with anyio.CancelScope(shield=True):
            await abort(request, withdraw, kill=request.kill_on_cancel)
        raise
    await call._finish()


@final
@attrs.define(eq=False, init=False)
class RPC:
    """Calls to one function in one worker process.

    Made by :func:`open_rpc`. Calls can be made from many tasks at once: a sync
    function's worker runs them one after the other in the order they were made, an
    async function's worker runs them all concurrently.
    """

    _connection: Connection
    _serializer: Serializer

    @classmethod
    def _create(cls, connection: Connection, serializer: Serializer) -> RPC:
        self = cls.__new__(cls)
        self._connection = connection
        self._serializer = serializer
        return self

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
    template: Template,
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
    options = await prepare_worker(
        template, function, init=init, init_args=init_args, serializer=serializer, events=events
    )
    async with template.spawn(_rpc_worker.serve, pickle_options(options)) as child:
        connection = Connection(child, child.stream.extra(SocketAttribute.raw_socket))
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
                    yield RPC._create(connection, options["serializer"])
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
