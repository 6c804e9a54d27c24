"""The parent's end of a command channel, and async I/O on raw process sockets.

A template answers its commands one at a time and in order, so replies are matched
to requests by position. Commands are written as soon as they are issued: a frame
goes into a write queue whole, and the queue is flushed on the spot when the socket
has room (nearly always), or by the writer task when it has not. A caller cancelled
while waiting for its reply therefore never leaves half a frame behind; its reply is
discarded when it arrives, and a process forked for it is killed.
"""

from __future__ import annotations

import pickle
import signal
import socket
from collections import deque

import anyio
import anyio.lowlevel
import attrs

from ._errors import BrokenTemplateError, RemoteError
from ._protocol import (
    ANCILLARY_SIZE,
    ERROR,
    EXITED,
    FORKED,
    HEADER,
    RECEIVE_SIZE,
    Frame,
    FrameReader,
    Segment,
    _padding,
    ancillary,
    close_all,
    encode,
    parse_ancillary,
    receive,
)

# Receives in a row before the reader lets other tasks run.
_FAIRNESS = 16


@attrs.define(eq=False)
class ExitSlot:
    """Where a process's exit status arrives; ``code`` stays None if it is lost."""

    event: anyio.Event = attrs.field(factory=anyio.Event)
    code: int | None = None


@attrs.define(eq=False)
class Reply:
    """The answer to one command, once it arrives."""

    event: anyio.Event = attrs.field(factory=anyio.Event)
    frame: Frame | None = None
    error: BaseException | None = None
    slot: ExitSlot | None = None
    abandoned: bool = False


def remote_error(frame: Frame) -> RemoteError:
    type_name, message, remote_traceback = pickle.loads(frame.payload)
    return RemoteError(type_name, message, remote_traceback)


def kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


@attrs.define(eq=False)
class Channel:
    """Commands to a process that serves them, and its replies and exit reports."""

    _sock: socket.socket
    name: str
    _pending: deque[Reply] = attrs.field(factory=deque)
    _exits: dict[int, ExitSlot] = attrs.field(factory=dict)
    _outbox: deque[Segment] = attrs.field(factory=deque)
    _wake_writer: anyio.Event = attrs.field(factory=anyio.Event)
    _broken: BrokenTemplateError | None = None
    _closed: bool = False
    # Kept here rather than in _read so that hand_over() can see a partial frame.
    _reader: FrameReader = attrs.field(factory=FrameReader)
    _handed_over: bool = False
    _idle: anyio.Event | None = None
    _running: bool = False

    def __attrs_post_init__(self) -> None:
        self._sock.setblocking(False)

    def expect(self) -> Reply:
        """A reply slot for a frame the process sends unasked (its READY)."""
        reply = Reply()
        self._pending.append(reply)
        return reply

    def command(
        self, op: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
    ) -> Reply:
        """Queue a command; the channel owns ``fds`` and closes them once sent."""
        if self._closed or self._broken is not None or self._handed_over:
            close_all(list(fds))
            self.check()
        reply = Reply()
        self._pending.append(reply)
        idle = not self._outbox
        self._outbox.extend(encode(op, payload, fds))
        if idle:
            self._flush()
        return reply

    def check(self) -> None:
        """Raise if the channel can no longer carry commands."""
        if self._handed_over:
            raise anyio.ClosedResourceError(f"{self.name} was handed over to another owner")
        self._check_alive()

    def _check_alive(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError(f"{self.name} is closed")
        if self._broken is not None:
            raise BrokenTemplateError(str(self._broken)) from self._broken.__cause__

    async def wait(self, reply: Reply) -> Frame:
        """The reply's frame; an ERROR reply is raised as :exc:`RemoteError`."""
        try:
            await reply.event.wait()
        except BaseException:
            self.abandon(reply)
            raise
        if reply.error is not None:
            # A fresh exception per waiter: tracebacks must not pile up on a shared one.
            raise type(reply.error)(str(reply.error)) from reply.error.__cause__
        assert reply.frame is not None
        if reply.frame.op == ERROR:
            raise remote_error(reply.frame)
        return reply.frame

    def abandon(self, reply: Reply) -> None:
        """Nobody will wait for this reply: discard it, now or when it arrives."""
        reply.abandoned = True
        if reply.frame is not None:
            _discard(reply.frame)
            reply.frame = None

    async def forked(self, reply: Reply) -> tuple[int, int, ExitSlot]:
        """Pid, pidfd and exit slot of the process a FORK command made."""
        frame = await self.wait(reply)
        assert reply.slot is not None
        if frame.fds_lost:
            raise OSError(
                "the pidfd of a new process was lost in transit: the kernel truncated the "
                "control message (is RLIMIT_NOFILE too low?)"
            )
        return pickle.loads(frame.payload), frame.fds[0], reply.slot

    def _flush(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                sent = self._sock.sendmsg([data], ancillary(fds))
            except BlockingIOError:
                self._wake_writer.set()
                return
            except OSError as exc:
                self._break(exc)
                return
            close_all(fds)
            if sent < len(data):
                self._outbox[0] = (data[sent:], [])
            else:
                self._outbox.popleft()

    async def run(self) -> None:
        """Read replies and flush writes until the channel closes or breaks."""
        self._running = True
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write)
                await self._read()
                task_group.cancel_scope.cancel()
        finally:
            self._running = False
            if self._closed:
                self._sock.close()

    async def _write(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = anyio.Event()
            while self._outbox and self._broken is None:
                try:
                    await anyio.wait_writable(self._sock)
                except anyio.ClosedResourceError:
                    return
                self._flush()

    async def _read(self) -> None:
        reader = self._reader
        buffer = memoryview(bytearray(RECEIVE_SIZE))
        cause: BaseException | None = None
        try:
            streak = 0
            while True:
                try:
                    if not receive(self._sock, reader, buffer):
                        break
                except BlockingIOError:
                    streak = 0
                    try:
                        await anyio.wait_readable(self._sock)
                    except anyio.ClosedResourceError:
                        return
                    continue
                while (frame := reader.next_frame()) is not None:
                    self._dispatch(frame)
                streak += 1
                if streak == _FAIRNESS:
                    streak = 0
                    await anyio.lowlevel.checkpoint()
        except OSError as exc:
            cause = exc
        finally:
            reader.close()
            if not self._closed:
                self._break(cause)

    def _dispatch(self, frame: Frame) -> None:
        if frame.op == EXITED:
            pid, code = pickle.loads(frame.payload)
            slot = self._exits.pop(pid, None)
            if slot is not None:
                slot.code = code
                slot.event.set()
            return
        if not self._pending:
            _discard(frame)
            self._break(None, f"{self.name} sent an unexpected reply")
            return
        reply = self._pending.popleft()
        if frame.op == FORKED and not reply.abandoned:
            reply.slot = self._exits[pickle.loads(frame.payload)] = ExitSlot()
        if reply.abandoned:
            _discard(frame)
        else:
            reply.frame = frame
            reply.event.set()
        if self._idle is not None:
            self._idle.set()

    def _break(self, cause: BaseException | None, message: str | None = None) -> None:
        if self._broken is not None:
            return
        error = BrokenTemplateError(message or f"{self.name} died or its channel broke")
        error.__cause__ = cause
        self._broken = error
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        while self._pending:
            reply = self._pending.popleft()
            reply.error = error
            reply.event.set()
        for slot in self._exits.values():
            slot.event.set()
        self._exits.clear()
        while self._outbox:
            close_all(self._outbox.popleft()[1])
        if self._idle is not None:
            self._idle.set()

    async def hand_over(self) -> socket.socket:
        """Stop using the channel, and return a copy of its socket for a new owner.

        Refuses new commands at once, then waits until every command already issued
        has been answered, so that the new owner starts at a frame boundary and is
        owed no reply of ours. Refused while a process forked through this channel
        runs: its exit status would be reported to the new owner. If cancelled while
        waiting, the channel stays ours and usable.
        """
        self.check()
        self._handed_over = True
        try:
            while True:
                self._check_alive()
                if self._exits:
                    raise RuntimeError(
                        f"{len(self._exits)} process(es) forked from {self.name} are still "
                        "running: leave their blocks before handing the template over"
                    )
                if not self._pending and not self._reader.buffered:
                    break
                self._idle = anyio.Event()
                await self._idle.wait()
        except BaseException:
            self._handed_over = False
            raise
        finally:
            self._idle = None
        sock = self._sock.dup()
        self.close()
        return sock

    def close(self) -> None:
        """Close our end: the process sees end of file and shuts down."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(anyio.ClosedResourceError(f"{self.name} is closed"))
        anyio.notify_closing(self._sock)
        # While run() unwinds, the descriptor must stay ours: on asyncio, a waiter
        # woken by notify_closing unregisters its descriptor number when it resumes,
        # and would unregister a new socket that reused the number (anyio 4.16).
        if not self._running:
            self._sock.close()


def _discard(frame: Frame) -> None:
    # A reply nobody waits for any more: a process forked for it must not live on.
    if frame.op == FORKED:
        for pidfd in frame.fds:
            kill_pidfd(pidfd)
    close_all(frame.fds)


async def send_frame(sock: socket.socket, op: int, payload: bytes, fds: list[int]) -> None:
    """Send one frame on a non-blocking socket; ``fds`` are closed once sent."""
    await send_segments(sock, encode(op, payload, fds))


async def send_segments(sock: socket.socket, segments: list[Segment]) -> None:
    pending = deque(segments)
    try:
        while pending:
            data, fds = pending[0]
            try:
                sent = sock.sendmsg([data], ancillary(fds))
            except BlockingIOError:
                await anyio.wait_writable(sock)
                continue
            close_all(fds)
            if sent < len(data):
                pending[0] = (data[sent:], [])
            else:
                pending.popleft()
    finally:
        for _, fds in pending:
            close_all(fds)


async def receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None at end of file before the first byte."""
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            if data:
                raise ConnectionResetError("end of file in the middle of a frame")
            return None
        data += chunk
    return bytes(data)


async def receive_frame(sock: socket.socket) -> Frame | None:
    """One frame without descriptors, reading no byte past it; None at end of file."""
    header = await receive_exactly(sock, HEADER.size)
    if header is None:
        return None
    op, nfds, length = HEADER.unpack(header)
    payload = b""
    if length:
        body = await receive_exactly(sock, length)
        if body is None:
            raise ConnectionResetError("end of file in the middle of a frame")
        payload = body
    return Frame(op, payload, [], nfds != 0)


async def receive_frame_with_fds(sock: socket.socket) -> Frame | None:
    """One frame and its descriptors, reading no byte past it; None at end of file.

    For the first frame on a socket that a :class:`Channel` takes over afterwards.
    """
    data = bytearray()
    fds: list[int] = []
    truncated = False
    size = HEADER.size
    try:
        while len(data) < size:
            try:
                chunk, ancdata, flags, _ = sock.recvmsg(
                    size - len(data), ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            fds.extend(parse_ancillary(ancdata))
            truncated = truncated or bool(flags & socket.MSG_CTRUNC)
            if not chunk:
                if data:
                    raise ConnectionResetError("end of file in the middle of a frame")
                return None
            data += chunk
            if len(data) == HEADER.size:
                _, nfds, length = HEADER.unpack(data)
                size = HEADER.size + length + _padding(nfds, length)
    except BaseException:
        close_all(fds)
        raise
    op, nfds, length = HEADER.unpack_from(data)
    payload = bytes(data[HEADER.size : HEADER.size + length])
    if truncated or len(fds) != nfds:
        close_all(fds)
        return Frame(op, payload, [], True)
    return Frame(op, payload, fds, False)
