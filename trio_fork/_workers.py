"""run_sync's workers: processes that outlive event loops, borrowed by one call at a time.

trio_parallel's default context belongs to the process: a worker that served a call
in one ``trio.run`` serves the next run's calls, and threads that run event loops of
their own share it. So a run_sync worker belongs to no event loop. It is forked on
request from its context's :class:`~trio_fork.TemplateHandle`, whose process reaps it
and reports its exit status on a pipe (see :mod:`trio_fork.worker._apply`). Between
calls it is a socket, a pidfd and that pipe; a call borrows it and talks to it with
whatever event loop the caller runs, reading its own reply.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import attrs

from ._channel import remote_error
from ._child import describe_exit
from ._errors import BrokenWorkerError, RemoteError
from ._handle import _send_request
from ._process import readable, signal_pidfd
from ._transport import ProtocolError, receive_frame, unpack_strings
from .worker import _buffers, _wire
from .worker._wire import CALL, ERROR, EVENT, FAILED, RESULT, RETIRING, WORKER_READY, encode

if TYPE_CHECKING:
    from ._handle import TemplateHandle

Wait = Callable[[socket.socket], Awaitable[None]]

# Once a worker is dead, how long to wait for its template to report the exit status:
# a template that is stopped reports late or never.
_REPORT_GRACE = 1.0


class WorkerDied(Exception):
    """The worker's socket ended (or broke) before the reply came."""


@attrs.define(eq=False, slots=True)
class Worker:
    """One worker process, as its context holds it between calls and a call uses it."""

    pid: int
    _pidfd: int
    _sock: socket.socket
    _reaped: int
    """The pipe on which the template reports the exit status, then closes."""
    calls: int = 0
    idle_since: float = 0.0
    retiring: bool = False
    """The worker said it exits after this call (its ``retire`` function said so)."""
    reusable: bool = False
    """Its last call ended with it ready for another."""
    main: object = None
    """Which main module of ours it takes on (see WorkerContext._take)."""
    broke_protocol: str | None = None
    buffers: bool = False
    """Whether replies may carry out-of-band buffers (only then are fds received)."""
    _reader: _wire.FrameReader = attrs.field(factory=_wire.FrameReader)
    _outbox: _wire.Outbox = attrs.field(factory=_wire.Outbox)
    _reply_due: bool = False
    _closed: bool = False

    def __attrs_post_init__(self) -> None:
        _buffers.enter()  # while it lives, the memfds of big arguments are reused

    def exited(self) -> bool:
        """Whether the process has exited (its pidfd turned readable)."""
        return readable(self._pidfd)

    def send(self, payload: bytes, fds: list[int] | tuple[()] = ()) -> None:
        """Start a call: send it, or as much of it as the socket takes now.

        ``fds`` (its buffers') are the outbox's from now on, to close once sent.
        """
        self._reply_due = True
        segments = encode(CALL, 1, payload, fds)
        if len(segments) == 1 and len(segments[0][0]) == 1 and not fds:
            data = segments[0][0][0]
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # it died: reading the reply says so
            if sent == len(data):
                return
            segments = [([data[sent:]], [])]
        self._outbox.put(segments)

    async def finish(self, wait_readable: Wait, wait_writable: Wait) -> _wire.Frame:
        """Send the rest of the call, then read its reply (RESULT or ERROR).

        Picks up where it was if called again after a cancellation.

        Raises:
            WorkerDied: The socket ended before the reply.
        """
        sock = self._sock
        while self._outbox:
            try:
                if self._outbox.flush(sock):
                    break
            except OSError:
                raise WorkerDied from None
            await wait_writable(sock)
        # The reply to a call just sent cannot be there yet: wait before reading.
        waited = not self._reply_due
        while True:
            frame = self._reader.next_frame()
            if frame is not None:
                if frame.op == RETIRING:
                    self.retiring = True
                    continue
                if frame.op == EVENT:
                    _wire.close_all(frame.fds)
                    continue  # trio_fork.worker.emit(): run_sync has no one to take it
                if frame.op in (RESULT, ERROR):
                    self._reply_due = False
                    return frame
                self._break_protocol(f"sent frame {frame.op} instead of a reply")
            if not waited:
                waited = True
                await wait_readable(sock)
                continue
            try:
                received = self._reader.receive(sock, fds=self.buffers)
            except BlockingIOError:
                await wait_readable(sock)
                continue
            except OSError:
                received = 0
            if not received:
                if self._reader.in_frame:
                    self._break_protocol("ended its socket in the middle of a frame")
                raise WorkerDied

    def _break_protocol(self, what: str) -> None:
        self.broke_protocol = f"broke the protocol ({what}) and was killed"
        self.kill()
        raise WorkerDied

    async def lost(self, running: bool) -> BrokenWorkerError:
        """The error for a call on a worker that died: how it ended, from its template."""
        self.kill()  # it may have closed its socket and lived on: it cannot serve again
        what = self.broke_protocol
        if what is None:
            status = await self._exit_status()
            if status is None:
                what = "died (its exit status was lost with its template)"
            else:
                what = f"was {describe_exit(status)}" if status < 0 else describe_exit(status)
        detail = "while running this call" if running else "before it was ready"
        return BrokenWorkerError(f"worker {self.pid} {what} {detail}")

    async def _exit_status(self) -> int | None:
        with anyio.move_on_after(_REPORT_GRACE):
            await anyio.wait_readable(self._reaped)
        try:
            data = os.read(self._reaped, _wire.EXIT_STATUS.size)
        except OSError:
            return None
        if len(data) != _wire.EXIT_STATUS.size:
            return None
        return int(_wire.EXIT_STATUS.unpack(data)[0])

    def kill(self) -> None:
        if not self._closed:
            signal_pidfd(self._pidfd, signal.SIGKILL)

    @property
    def reaped_fd(self) -> int:
        return self._reaped

    def end(self) -> None:
        """End of file on its socket: it exits, and its template reaps it."""
        if not self._closed:
            self._sock.close()

    def close(self) -> None:
        """Let go of it: at end of file on its socket it exits, and its template reaps it."""
        if self._closed:
            return
        self._closed = True
        _buffers.leave()
        self._sock.close()
        self._reader.close()
        self._outbox.clear()
        _wire.close_all([self._pidfd, self._reaped])


async def start_worker(handle: TemplateHandle, invoke: bytes) -> Worker:
    """Fork a template from ``handle`` and make it a worker with ``invoke`` (an INVOKE frame).

    Raises:
        BrokenTemplateError: The handle's process has died.
        anyio.ClosedResourceError: The handle was closed.
        RemoteError: The fork failed, or the worker could not start (``init`` raised,
            or what the worker needs cannot be unpickled there).
        BrokenWorkerError: The worker died before it was ready.
    """
    ours, theirs = socket.socketpair()
    reaped_read, reaped_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            with handle._duplicate_requests() as requests:
                await _send_request(requests, [theirs.fileno(), reaped_write], handle)
        finally:
            theirs.close()
            os.close(reaped_write)
        ours.setblocking(False)
        # Waiting for the fork's READY first would cost a round trip: the command is
        # there when the fork starts serving.
        view = memoryview(invoke)
        while view:
            try:
                view = view[ours.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(ours)
            except OSError:
                break  # no fork to read it: the READY never comes, and says why
        pid, pidfd = handle._check_ready(await receive_frame(ours))
    except BaseException:
        ours.close()
        os.close(reaped_read)
        raise
    worker = Worker(pid, pidfd, ours, reaped_read)
    try:
        frame = await _first_frame(worker)
        if frame is None:
            raise await worker.lost(running=False)
        if frame.op == WORKER_READY:
            return worker
        if frame.op == FAILED:
            name, message, text = unpack_strings(frame.payload, 3)[:3]
            raise RemoteError(str(name), str(message), str(text))
        if frame.op == ERROR:
            raise remote_error(frame)
        raise ProtocolError(f"a new worker sent frame {frame.op}")
    except BaseException:
        worker.kill()
        worker.close()
        raise


async def _first_frame(worker: Worker) -> _wire.Frame | None:
    reader, sock = worker._reader, worker._sock
    while (frame := reader.next_frame()) is None:
        try:
            if not reader.receive(sock, fds=False):
                return None
        except BlockingIOError:
            await anyio.wait_readable(sock)
        except OSError:
            return None
    return frame


def invoke_frame(payload: bytes) -> bytes:
    """An INVOKE command, as the bytes of one frame."""
    segments = encode(_wire.INVOKE, 1, payload)
    return b"".join(bytes(buffer) for buffers, _ in segments for buffer in buffers)


def wait_reaped(workers: list[Worker], timeout: float) -> None:
    """Block until the templates of ``workers`` have reaped them all, or ``timeout``."""
    poller = select.poll()
    pending = {worker.reaped_fd for worker in workers}
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for fd, _ in poller.poll(min(remaining, 3600.0) * 1000):
            poller.unregister(fd)
            pending.discard(fd)
