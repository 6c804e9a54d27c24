"""The parent's end of one RPC worker: requests out, replies and events in.

A request stays registered from the moment it is sent until the worker has answered
it (result, error, or ``CANCELLED``) or has died. Nothing is ever abandoned on the
way: a cancelled caller asks the worker to cancel and waits, shielded, for its
answer, so the parent always knows what the worker is doing. Writes go into a queue
of whole frames that is flushed at once when the socket has room (nearly always) or
by the writer task when it has not, so a cancelled caller never leaves half a frame.
"""

from __future__ import annotations

import itertools
import pickle
import signal
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import attrs

from ._errors import BrokenTemplateError, BrokenWorkerError, RemoteError
from ._rpc_wire import (
    CALL,
    CANCEL,
    CANCELLED,
    ERROR,
    EVENT,
    FAILED,
    READY,
    RESULT,
    FrameDecoder,
    encode,
)

if TYPE_CHECKING:
    from ._child import Child

# Frames handled in a row before the reader lets other tasks run.
_FAIRNESS = 64
_MAX_BUFFERS = 512
# How long a worker that closed its socket may take to exit before it is killed.
_EXIT_GRACE = 5.0

LOST = 0
"""A request's kind when its worker died before answering it."""


@attrs.define(eq=False, slots=True)
class Request:
    """One call, from the moment it is made until its outcome is known.

    ``kind`` is 0 until then, and ``RESULT``, ``ERROR``, ``CANCELLED`` or
    :data:`LOST` after; ``value`` is the result's payload, the error's description,
    or the :exc:`BrokenWorkerError` of a lost request.
    """

    payload: bytes
    kill_on_cancel: bool
    done: anyio.Event = attrs.field(factory=anyio.Event)
    id: int = 0
    kind: int = -1
    value: Any = None
    connection: Connection | None = None
    cancel_sent: bool = False
    # Serialized events not yet taken, and who to wake when one comes; None for
    # callers that do not listen.
    events: deque[bytes] | None = None
    wakeup: anyio.Event | None = None
    started: bool = False
    """Whether the worker may have started it: False only when it provably has not."""

    def finish(self, kind: int, value: Any) -> None:
        self.kind = kind
        self.value = value
        self.done.set()
        if self.wakeup is not None:
            self.wakeup.set()


def unwrap_error(value: tuple[str, str, str, bytes], originals: bool) -> BaseException:
    """The exception to raise for an ERROR reply's description."""
    type_name, message, remote_traceback, original = value
    error = RemoteError(type_name, message, remote_traceback)
    if not (originals and original):
        return error
    try:
        exc = pickle.loads(original)
    except Exception:
        return error
    if not isinstance(exc, BaseException):
        return error
    # As concurrent.futures does: the remote traceback is shown as the cause.
    exc.__cause__ = error
    return exc


@attrs.define(eq=False)
class Connection:
    """Requests to one worker process and their replies.

    ``on_finished`` is called (synchronously) each time a request's outcome becomes
    known, which is how a pool keeps count of each worker's load.
    """

    child: Child
    _sock: socket.socket
    on_finished: Callable[[Connection, Request], None] | None = None
    concurrent: bool = False
    ready: anyio.Event = attrs.field(factory=anyio.Event)
    failure: BaseException | None = None
    lost: BrokenWorkerError | None = None
    closing: bool = False
    """No new calls: the owner is closing this worker."""
    _requests: dict[int, Request] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _outbox: deque[memoryview] = attrs.field(factory=deque)
    _writer_blocked: bool = False
    _wake_writer: anyio.Event = attrs.field(factory=anyio.Event)
    _write_closed: bool = False
    _idle: anyio.Event | None = None

    def __attrs_post_init__(self) -> None:
        self._sock.setblocking(False)

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def load(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._requests)

    def send(self, request: Request) -> None:
        """Send a call; its outcome arrives in ``request``."""
        if self.closing:
            raise anyio.ClosedResourceError(f"the RPC to worker {self.pid} is closed")
        if self.lost is not None:
            raise BrokenWorkerError(str(self.lost))
        request.id = next(self._ids) & 0xFFFFFFFF
        request.connection = self
        request.started = True
        self._requests[request.id] = request
        self._write(encode(CALL, request.id, request.payload))

    def cancel(self, request: Request) -> None:
        """Ask the worker to cancel a call; its answer arrives as usual."""
        if not request.cancel_sent and request.kind < 0 and self.lost is None:
            request.cancel_sent = True
            self._write(encode(CANCEL, request.id))

    def is_running(self, request: Request) -> bool:
        """Whether the worker may be running ``request`` right now.

        A sync worker runs calls one at a time in the order sent, so only the oldest
        unanswered one can be running; an async worker may be running them all.
        """
        if self.concurrent:
            return True
        return next(iter(self._requests.values()), None) is request

    def kill(self) -> None:
        self.child.kill()

    def close_write(self) -> None:
        """End of file to the worker: it exits once it has nothing left to do."""
        if not self._write_closed and not self._outbox:
            self._write_closed = True
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    async def wait_idle(self) -> None:
        """Wait until every request sent has been answered (or the worker died)."""
        while self._requests:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def run(self) -> None:
        """Serve the worker: read and write until it exits, then fail what is left."""
        status: int | None = None
        stopped = True
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write_when_blocked)
                await self._read()
                # End of file: the worker exited or closed its socket. A worker that
                # closed it but lives on cannot be served and is ended.
                with anyio.move_on_after(_EXIT_GRACE):
                    status = await self._wait_exit()
                if status is None and self.child.returncode is None:
                    self.kill()
                    status = await self._wait_exit()
                task_group.cancel_scope.cancel()
            stopped = False
        finally:
            self._lose("was stopped" if stopped else _describe_status(status))

    async def _wait_exit(self) -> int | None:
        try:
            return await self.child.wait()
        except BrokenTemplateError:
            return None

    def _write(self, buffers: list[bytes]) -> None:
        for buffer in buffers:
            self._outbox.append(memoryview(buffer))
        if not self._writer_blocked:
            self._flush()

    def _flush(self) -> None:
        outbox = self._outbox
        while outbox:
            try:
                if len(outbox) == 1:
                    sent = self._sock.send(outbox[0])
                else:
                    sent = self._sock.sendmsg(itertools.islice(outbox, _MAX_BUFFERS))
            except BlockingIOError:
                self._writer_blocked = True
                self._wake_writer.set()
                return
            except OSError:
                # The worker is gone: the reader finds out and fails the requests.
                outbox.clear()
                break
            while sent:
                if sent >= len(outbox[0]):
                    sent -= len(outbox.popleft())
                else:
                    outbox[0] = outbox[0][sent:]
                    sent = 0
        self._writer_blocked = False

    async def _write_when_blocked(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = anyio.Event()
            while self._writer_blocked:
                try:
                    await anyio.wait_writable(self._sock)
                except (anyio.ClosedResourceError, OSError):
                    return
                self._flush()

    async def _read(self) -> None:
        decoder = FrameDecoder()
        sock = self._sock
        handled = 0
        while True:
            try:
                if decoder.receive(sock) == 0:
                    return
            except BlockingIOError:
                handled = 0
                await anyio.wait_readable(sock)
                continue
            except OSError:
                return
            while (frame := decoder.next_frame()) is not None:
                self._dispatch(*frame)
                handled += 1
            if handled >= _FAIRNESS:
                handled = 0
                await anyio.lowlevel.checkpoint()

    def _dispatch(self, kind: int, call_id: int, payload: bytes) -> None:
        if kind == EVENT:
            request = self._requests.get(call_id)
            if request is not None and request.events is not None:
                request.events.append(payload)
                if request.wakeup is not None:
                    request.wakeup.set()
            return
        if kind in (RESULT, ERROR, CANCELLED):
            request = self._requests.pop(call_id, None)
            if request is None:
                return
            value: Any = payload
            if kind == ERROR:
                value = pickle.loads(payload)
            request.finish(kind, value)
            self._finished(request)
        elif kind == READY:
            self.concurrent = bool(pickle.loads(payload)["concurrent"])
            self.ready.set()
        elif kind == FAILED:
            self.failure = RemoteError(*pickle.loads(payload))
            self.ready.set()

    def _finished(self, request: Request) -> None:
        if self.on_finished is not None:
            self.on_finished(self, request)
        if not self._requests and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _lose(self, what: str) -> None:
        """The worker is gone: fail every request it had not answered."""
        self.lost = BrokenWorkerError(f"worker {self.pid} {what}")
        if not self.ready.is_set():
            self.ready.set()
        requests = list(self._requests.values())
        self._requests.clear()
        running = True
        for request in requests:
            if not running:
                # A sync worker runs calls in order: those after the running one
                # never started, and a pool may safely send them elsewhere.
                request.started = False
            detail = "while running this call" if running else "before this call started"
            error = BrokenWorkerError(f"worker {self.pid} {what} {detail}")
            request.finish(LOST, error)
            self._finished(request)
            running = self.concurrent
        if self._idle is not None:
            self._idle.set()
            self._idle = None


def _describe_status(status: int | None) -> str:
    if status is None:
        return "died (its exit status was lost with its template)"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
