"""One call to a worker, from the moment it is made until its outcome is known.

What RPCs and pools share: the :class:`Request` that carries a call, the waits (which
read the worker's socket when it is the caller's turn), stopping a call exactly when
its caller is cancelled, its outcome, and :class:`Call`; and, with ``run_sync``, how
a cancellation that came while a call finished is kept or raised.
"""

from __future__ import annotations

import math
import pickle
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio
import anyio.lowlevel
import attrs

from ._arguments import Serializer
from ._construct import NoPublicConstructor
from ._errors import RemoteError
from .worker._wire import CANCELLED, ERROR, RESULT

if TYPE_CHECKING:
    from ._connection import Connection

LOST = 0
"""A request's kind when its worker died before answering it."""

T = TypeVar("T")


@attrs.define(eq=False, slots=True)
class Request:
    """One call, from the moment it is made until its outcome is known.

    ``kind`` is -1 until then, and ``RESULT``, ``ERROR``, ``CANCELLED`` or
    :data:`LOST` after; ``value`` is the result's payload, the error's description,
    or the :exc:`BrokenWorkerError` of a lost request.
    """

    payload: bytes
    kill_on_cancel: bool
    id: int = 0
    kind: int = -1
    value: Any = None
    connection: Connection | None = None
    """Where it was sent; None while a pool holds it back."""
    cancel_sent: bool = False
    cancelling: bool = False
    """The caller is stopping it: it must never be sent anywhere again."""
    # Serialized events not yet taken; None for callers that do not listen.
    events: deque[bytes] | None = None
    # Set to wake the task waiting on this request: it is done, an event came, it
    # was sent, or it is this task's turn to read.
    turn: anyio.Event | None = None

    @property
    def done(self) -> bool:
        return self.kind >= 0

    def finish(self, kind: int, value: Any) -> None:
        self.kind = kind
        self.value = value
        self.wake()

    def wake(self) -> None:
        if self.turn is not None:
            self.turn.set()


async def sleep_until_woken(request: Request) -> None:
    request.turn = turn = anyio.Event()
    try:
        await turn.wait()
    finally:
        request.turn = None


async def wait_until(request: Request, condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, reading the socket when it is our turn."""
    while not condition():
        connection = request.connection
        if connection is not None and connection.readable:
            await connection.read_for(request, condition)
        else:
            await sleep_until_woken(request)


def unwrap_error(value: list[str | bytes], originals: bool) -> BaseException:
    """The exception to raise for an ERROR reply's fields (see ``pack_strings``).

    With ``originals`` (run_sync, whose contract is pickle), the original exception
    is unpickled when the worker could send it; otherwise nothing is.
    """
    type_name, message, remote_traceback = (str(field) for field in value[:3])
    original = value[3] if len(value) > 3 else b""
    error = RemoteError(type_name, message, remote_traceback)
    if not (originals and original):
        return error
    try:
        exc = pickle.loads(original)  # type: ignore[arg-type]
    except Exception:
        return error
    if not isinstance(exc, BaseException):
        return error
    # As concurrent.futures does: the remote traceback is shown as the cause.
    exc.__cause__ = error
    return exc


Withdraw = Callable[[Request], bool]
"""Takes back a request that was never sent; False if it is no longer waiting."""


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


async def shielded(step: Callable[[], Awaitable[T]]) -> tuple[T, BaseException | None]:
    """``await step()`` shielded from cancellation, asyncio's own included.

    The cancellation of a trio or anyio cancel scope waits behind the shield, and
    comes again at the next checkpoint. asyncio's ``task.cancel()`` (what
    ``asyncio.timeout``, ``asyncio.wait_for`` and Ctrl+C under ``asyncio.run`` do)
    goes through anyio's shields, and comes only once: it is held back, and returned
    with the result for the caller to raise once it is done. ``step`` is called
    again after such an interruption, so it must pick up where it was.
    """
    held: BaseException | None = None
    cancelled = anyio.get_cancelled_exc_class()
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await step()
            except cancelled as exc:
                held = exc
                continue
            return result, held
    raise AssertionError("unreachable")  # pragma: no cover (mypy: a shield may swallow)


def cancellation_kept() -> bool:
    """Whether a cancellation that was caught, and not raised, comes again.

    Always on trio, where being cancelled is the state of a cancel scope, and for
    anyio's cancel scopes on asyncio: the cancellation takes effect at the next
    checkpoint, so an operation that completed may return its outcome. Not for
    asyncio's own ``task.cancel()``, which is delivered once: then the caller must
    raise the cancellation rather than return (and ``asyncio.timeout``, which counts
    the cancellations it asked for, converts it to :exc:`TimeoutError`).
    """
    return anyio.current_effective_deadline() == -math.inf


async def wait_for(request: Request, withdraw: Withdraw | None = None) -> None:
    """Wait for a request's outcome; if cancelled, stop the call exactly first.

    The cancellation is raised if the call was stopped (or never ran); a call that
    finished before it could be stopped keeps its outcome, and the cancellation
    takes effect at the caller's next checkpoint, as with any operation that
    completed. A cancellation that comes only once (asyncio's ``task.cancel()``) is
    raised even then, once the worker's state is known.
    """
    try:
        await wait_until(request, lambda: request.done)
    except anyio.get_cancelled_exc_class():
        _, held = await shielded(lambda: abort(request, withdraw, kill=request.kill_on_cancel))
        if request.kind not in (RESULT, ERROR) or held is not None or not cancellation_kept():
            raise
    except BaseException:
        # KeyboardInterrupt and the like: nothing is known, so nothing is kept.
        await shielded(lambda: abort(request, withdraw, kill=True))
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
@attrs.define(eq=False)
class Call(metaclass=NoPublicConstructor):
    """A call in progress, with the events its function sends.

    Made by :meth:`RPC.open_call` and :meth:`Pool.open_call`. Iterate over it to
    receive the events, in the order they were sent; the iteration ends when the
    call has finished. Events that arrive before you iterate are kept for you.
    """

    _request: Request
    _serializer: Serializer
    _withdraw: Withdraw | None
    _taken: bool = False

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
        await shielded(lambda: abort(request, withdraw, kill=request.kill_on_cancel))
        raise
    await call._finish()
