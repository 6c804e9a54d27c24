"""The parent's end of one RPC worker: calls out, replies and events in.

A request stays registered from the moment it is sent until the worker has answered
it (result, error, or ``CANCELLED``) or has died. Nothing is abandoned on the way: a
cancelled caller asks the worker to cancel and waits, shielded, for its answer, so
the parent always knows what the worker is doing.

Replies are read by the callers waiting for them, not by a task of their own: one
waiting caller at a time reads the socket and hands out every frame it finds, and
when its own reply has come it passes the job to another waiting caller. A caller
that waits alone thus reads its reply itself, without a hand-off between tasks,
which roughly triples the rate of back-to-back calls. (On asyncio a reader callback
that stays registered does the reading instead; for a worker on another host, the
mux hands out what comes on the worker's stream as it reads the ssh connection.)
Writes go through a :class:`~trio_fork._frame_writer.FrameWriter`.

The connection owns the worker's socket; a worker that breaks the protocol is
killed, and its calls fail with :exc:`BrokenWorkerError`.
"""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import sniffio

from ._call import LOST, Request, sleep_until_woken, wait_until
from ._child import Process, describe_exit
from ._errors import BrokenTemplateError, BrokenWorkerError, RemoteError
from ._frame_writer import FrameWriter
from ._mux_stream import Stream, take_over
from ._outofband import open_frame
from ._transport import ProtocolError, Transport, unpack_strings
from .worker import _wire
from .worker._wire import (
    CALL,
    CANCEL,
    CANCELLED,
    ERROR,
    EVENT,
    FAILED,
    RESULT,
    RETIRING,
    WORKER_READY,
    encode,
)

# Frames handed out in a row before the reading caller lets other tasks run.
_FAIRNESS = 256
# How long a worker that closed its socket may take to exit before it is killed.
_EXIT_GRACE = 5.0
# What a worker may send: opcode -> payload size (None: any).
_FROM_WORKER = {
    RESULT: None,
    ERROR: None,
    EVENT: None,
    CANCELLED: 0,
    WORKER_READY: _wire.WORKER.size,
    FAILED: None,
    RETIRING: 0,
}


@attrs.define(eq=False)
class Connection:
    """Requests to one worker process and their replies.

    ``on_finished`` is called (synchronously) each time a request's outcome becomes
    known, which is how a pool keeps count of each worker's load. ``requeue`` is
    given back each request that provably never started when the worker dies.
    ``on_lost`` is called once the worker is gone and every request it held is
    settled; ``on_retiring`` when the worker says it will exit after its current call;
    ``on_event`` with each event the worker sends outside a call.
    """

    process: Process
    _transport: Transport
    on_finished: Callable[[Connection, Request], None] | None = None
    requeue: Callable[[Request], None] | None = None
    on_lost: Callable[[Connection], None] | None = None
    on_retiring: Callable[[Connection], None] | None = None
    on_event: Callable[[Any], None] | None = None
    concurrent: bool = False
    buffers: bool = False
    """Whether replies may carry out-of-band buffers (only then are fds received)."""
    failure: BaseException | None = None
    lost: BrokenWorkerError | None = None
    closing: bool = False
    """No new calls: the owner is closing this worker."""
    retired: bool = False
    """The worker said it retires: it gets end of file once its calls are answered."""
    readable: bool = True
    """Whether the socket may still be read; False after end of file."""
    _ready: bool = False
    _ready_waiter: Request = attrs.field(factory=lambda: Request(b"", False))
    _requests: dict[int, Request] = attrs.field(factory=dict)
    _next_id: int = 1
    _reading: bool = False
    _nothing_since_send: bool = False
    _followers: dict[Request, None] = attrs.field(factory=dict)
    _end_of_file: anyio.Event = attrs.field(factory=anyio.Event)
    _idle: anyio.Event | None = None
    _wait_readable: Callable[[socket.socket], Awaitable[None]] = attrs.field(init=False)
    _closed_error: type[Exception] = attrs.field(init=False)
    _loop: Any = None
    _sock: socket.socket = attrs.field(init=False)
    _direct: Stream | None = None
    _writer: FrameWriter = attrs.field(init=False)
    _broke_protocol: str | None = None

    def __attrs_post_init__(self) -> None:
        assert self._transport.sock is not None
        self._sock = self._transport.sock
        self._ready_waiter.connection = self
        # A worker on another host: its frames come and go in the mux's, and what
        # comes is handed out by the mux as it reads (see read_for).
        self._direct = take_over(self._sock, self._on_readable)
        self._writer = FrameWriter(self._transport.outbox, self._sock, self._direct)
        if self._direct is not None:
            self._on_readable()  # what came before (the worker's READY, say)
        # The backend's own wait, looked up once: anyio's looks the backend up on
        # every call, and every call of ours waits.
        if sniffio.current_async_library() == "trio":
            import trio

            self._wait_readable = trio.lowlevel.wait_readable
            self._closed_error = trio.ClosedResourceError
        else:
            # On asyncio, a reader callback that stays registered hands out the
            # replies as they come: waiting callers registering and unregistering
            # the socket for every call would cost two system calls each time.
            import asyncio

            self._loop = asyncio.get_running_loop()
            self._wait_readable = anyio.wait_readable
            self._closed_error = anyio.ClosedResourceError

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def load(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._requests)

    async def wait_ready(self) -> None:
        """Wait for the worker's READY (or FAILED, or its death)."""
        await wait_until(self._ready_waiter, lambda: self._ready)

    def send(self, request: Request) -> None:
        """Send a call; its outcome arrives in ``request``."""
        if self.closing:
            raise anyio.ClosedResourceError(f"the RPC to worker {self.pid} is closed")
        if self.lost is not None:
            raise BrokenWorkerError(str(self.lost))
        # Copies of the buffers' descriptors, made first: they can fail (EMFILE).
        fds = () if request.fds is None else request.fds.copies()
        request.id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        request.connection = self
        self._requests[request.id] = request
        self._nothing_since_send = True
        self._writer.write(
            encode(CALL, request.id, request.payload, fds), now=len(self._requests) == 1
        )
        request.wake()

    def cancel(self, request: Request) -> None:
        """Ask the worker to cancel a call; its answer arrives as usual."""
        if not request.cancel_sent and not request.done and self.lost is None:
            request.cancel_sent = True
            self._writer.write(encode(CANCEL, request.id))

    def is_running(self, request: Request) -> bool:
        """Whether the worker may be running ``request`` right now.

        A sync worker runs calls one at a time in the order sent, so only the oldest
        unanswered one can be running; an async worker may be running them all.
        """
        if self.concurrent:
            return True
        return next(iter(self._requests.values()), None) is request

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def close_write(self) -> None:
        """End of file to the worker (after what is queued): it exits when idle."""
        self._writer.close_write()

    async def wait_idle(self) -> None:
        """Wait until every request sent has been answered (or the worker died)."""
        while self._requests:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def read_for(self, request: Request, condition: Callable[[], bool]) -> None:
        """Read and hand out frames until ``condition()`` holds, if it is our turn.

        Returns early when another task is reading (after being woken), when the
        request moves elsewhere, or when the socket can no longer be read.
        """
        if self._loop is not None or self._direct is not None:
            # The reader callback reads; callers only wait to be woken.
            await sleep_until_woken(request)
            return
        if self._reading:
            self._followers[request] = None
            try:
                await sleep_until_woken(request)
            finally:
                self._followers.pop(request, None)
            return
        self._reading = True
        try:
            await self._read(request, condition)
        finally:
            self._reading = False
            # A caller still asleep takes over reading. One already woken (its reply
            # or an event came) checks its own condition and, if that is not met,
            # reads without being told.
            followers = self._followers
            while followers:
                follower = next(iter(followers))
                del followers[follower]
                if follower.turn is not None and not follower.turn.is_set():
                    follower.turn.set()
                    break

    async def run(self) -> None:
        """Watch the worker until it exits, then fail what it left unanswered.

        Also flushes writes the socket had no room for.
        """
        what = "was stopped"
        if self._loop is not None and self._direct is None:
            self._loop.add_reader(self._sock, self._on_readable)
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._writer.run)
                task_group.start_soon(self._end_if_socket_closes)
                status = await self._wait_exit()
                task_group.cancel_scope.cancel()
            self._drain()
            what = self._broke_protocol or _describe_status(status)
        finally:
            if self._loop is not None and self._direct is None:
                self._loop.remove_reader(self._sock)
            self.readable = False
            # Descriptors of frames that will never be sent, or never complete.
            self._transport.outbox.clear()
            self._transport.reader.close()
            self._lose(what)
            # Wake a caller still waiting for the socket: there is nothing more.
            anyio.notify_closing(self._sock)

    async def _wait_exit(self) -> int | None:
        try:
            return await self.process.wait()
        except BrokenTemplateError:
            return None

    async def _end_if_socket_closes(self) -> None:
        # A worker that closed its socket but lives on can never be served again.
        await self._end_of_file.wait()
        await anyio.sleep(_EXIT_GRACE)
        self.kill()

    async def _read(self, request: Request, condition: Callable[[], bool]) -> None:
        sock = self._sock
        handled = 0
        # A lone call just sent has no reply yet: do not ask the socket for one.
        skip_receive = self._nothing_since_send and len(self._requests) == 1
        while not condition() and request.connection is self and self.readable:
            try:
                if skip_receive:
                    skip_receive = False
                    raise BlockingIOError
                received = self._receive()
            except BlockingIOError:
                handled = 0
                try:
                    await self._wait_readable(sock)
                except self._closed_error:
                    return
                continue
            except OSError:
                received = 0
            if not received:
                self._at_end_of_file()
                return
            self._nothing_since_send = False
            handled += self._hand_out()
            if handled >= _FAIRNESS:
                handled = 0
                await anyio.lowlevel.checkpoint()

    def _receive(self) -> int:
        """Receive what has come (see FrameReader.receive)."""
        if self._direct is not None:
            # A stream taken over offers recv_into, all that a receive without
            # descriptors asks of a socket.
            return self._transport.reader.receive(self._direct, fds=False)  # type: ignore[arg-type]
        return self._transport.receive(fds=self.buffers)

    def _on_readable(self) -> None:
        """The reader callback (asyncio's, or the mux's): hand out what has come."""
        direct = self._direct
        while self.readable and (direct is None or direct.pending or direct.got_end):
            try:
                received = self._receive()
            except BlockingIOError:
                return
            except OSError:
                received = 0
            if not received:
                self._at_end_of_file()
                return
            self._hand_out()
            if self._direct is None:
                return  # asyncio calls again if there is more

    def _at_end_of_file(self) -> None:
        if self._loop is not None and self._direct is None:
            self._loop.remove_reader(self._sock)
        if self.readable and self._transport.reader.in_frame and self._broke_protocol is None:
            self._break_protocol(ProtocolError("end of file in the middle of a frame"))
        self.readable = False
        self._end_of_file.set()

    def _drain(self) -> None:
        """Hand out whatever a dead worker left in the socket."""
        while self.readable:
            try:
                if not self._receive():
                    break
            except OSError:
                break
            self._hand_out()

    def _hand_out(self) -> int:
        """Dispatch every complete frame received; how many."""
        count = 0
        next_frame, dispatch = self._transport.reader.next_frame, self._dispatch
        try:
            while self.readable and (frame := next_frame()) is not None:
                dispatch(frame)
                count += 1
            if self.readable:
                self._check_pending()
        except (ProtocolError, struct.error) as exc:
            self._break_protocol(exc)
        return count

    def _check_pending(self) -> None:
        """Refuse the frame being received as soon as its header shows it is not ours.

        Its payload may never come (a header of random bytes announces up to 16 EiB):
        waiting for it would hang every call of the worker.
        """
        header = self._transport.pending_header()
        if header is None:
            return
        op, nfds, _, length = header
        if op not in _FROM_WORKER:
            raise ProtocolError(f"unknown frame {op}")
        # A reply's buffers ride on its first bytes: they are here with its header.
        if nfds and not (
            self.buffers
            and op in (RESULT, EVENT)
            and self._transport.reader.pending_fds >= min(nfds, _wire.MAX_FDS_PER_MESSAGE)
        ):
            raise ProtocolError(f"a frame with {nfds} descriptors")
        size = _FROM_WORKER[op]
        if size is not None and length != size:
            raise ProtocolError(f"a frame {op} of {length} bytes")

    def _break_protocol(self, exc: BaseException) -> None:
        """The worker sent what is not a frame of ours: it is broken; kill it.

        Its calls fail at once: nothing it sends from now on can be trusted, and its
        death may be reported late (by a template busy with a long command).
        """
        if self._broke_protocol is None:
            self._broke_protocol = f"broke the protocol ({exc}) and was killed"
        if self._loop is not None and self._direct is None and self.readable:
            self._loop.remove_reader(self._sock)
        self.readable = False
        self._end_of_file.set()
        self.kill()
        self._lose(self._broke_protocol)

    def _dispatch(self, frame: _wire.Frame) -> None:
        kind = frame.op
        if kind == RESULT and not (frame.fds or frame.fds_lost):  # most frames, the short way
            request = self._requests.pop(frame.id, None)
            if request is not None:
                request.finish(RESULT, frame.payload)
                self._finished(request)
            return
        if frame.fds_lost and not self.buffers:
            raise ProtocolError("a frame with descriptors")
        value: Any = frame.payload
        if frame.fds or frame.fds_lost:
            if kind not in (RESULT, EVENT):
                _wire.close_all(frame.fds)
                raise ProtocolError(f"descriptors came with frame {kind}")
            # Mapped now: their lifetime is the objects', taken or not.
            value = open_frame(frame)
        if kind == EVENT:
            if frame.id == 0:  # outside any call
                if self.on_event is not None:
                    self.on_event(value)
                return
            request = self._requests.get(frame.id)
            if request is not None and request.events is not None:
                request.events.append(value)
                request.wake()
            return
        if kind in (RESULT, ERROR, CANCELLED):
            if kind == ERROR:
                value = unpack_strings(frame.payload, 3)
            request = self._requests.pop(frame.id, None)
            if request is None:
                return
            request.finish(kind, value)
            self._finished(request)
        elif kind == WORKER_READY:
            self.concurrent = _wire.WORKER.unpack(frame.payload)[1]
            self._set_ready()
        elif kind == FAILED:
            name, message, text = unpack_strings(frame.payload, 3)[:3]
            self.failure = RemoteError(str(name), str(message), str(text))
            self._set_ready()
        elif kind == RETIRING:
            self.closing = self.retired = True
            if not self._requests:
                self.close_write()
            if self.on_retiring is not None:
                self.on_retiring(self)
        else:
            raise ProtocolError(f"unknown frame {kind}")

    def _set_ready(self) -> None:
        self._ready = True
        self._ready_waiter.wake()

    def _finished(self, request: Request) -> None:
        if self.on_finished is not None:
            self.on_finished(self, request)
        if not self._requests and self.retired:
            self.close_write()  # an async worker that retired exits at end of file
        if not self._requests and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _lose(self, what: str) -> None:
        """The worker is gone (or as good as): fail every request it had not answered."""
        if self.lost is not None:
            return
        self.lost = BrokenWorkerError(f"worker {self.pid} {what}")
        self._set_ready()
        requests = list(self._requests.values())
        self._requests.clear()
        running = True
        for request in requests:
            if not running:
                # A sync worker runs calls in order: those after the running one
                # never started, and may safely be sent elsewhere.
                if not request.cancelling and self.requeue is not None:
                    self.requeue(request)
                    continue
            detail = "while running this call" if running else "before this call started"
            request.finish(LOST, BrokenWorkerError(f"worker {self.pid} {what} {detail}"))
            self._finished(request)
            running = self.concurrent
        for follower in list(self._followers):
            follower.wake()
        if self._idle is not None:
            self._idle.set()
            self._idle = None
        if self.on_lost is not None:
            self.on_lost(self)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "died (its exit status was lost with its template)"
    return f"was {describe_exit(status)}" if status < 0 else describe_exit(status)
