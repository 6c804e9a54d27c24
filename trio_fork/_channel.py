"""The parent's end of a command channel, and async I/O on raw process sockets.

Commands are numbered in the order they are sent; a template answers them one at a
time, in order, and each reply carries the number of its command, so a command may
also go unanswered: a SPAWN that works is confirmed by the child itself. Commands
are written as soon as they are issued: a frame goes into a write queue whole, and
the queue is flushed on the spot when the socket has room (nearly always), or by the
writer task when it has not. A caller cancelled while waiting for its reply
therefore never leaves half a frame behind; its reply is discarded when it arrives,
and a process made for it is killed.
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
    EXIT_STATUS,
    EXITED,
    FORK,
    FORKED,
    HEADER,
    KILL,
    PID,
    READY,
    RECEIVE_SIZE,
    SEQ,
    SPAWN,
    Frame,
    FrameReader,
    Segment,
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
    """Where the end of a process made by a FORK or SPAWN command is reported.

    ``code`` is its exit status. ``error`` is set instead when the command failed
    and no process was made. Both stay None if the channel broke first.
    """

    event: anyio.Event = attrs.field(factory=anyio.Event)
    code: int | None = None
    error: RemoteError | None = None


@attrs.define(eq=False)
class Reply:
    """The answer to one command, once it arrives."""

    event: anyio.Event = attrs.field(factory=anyio.Event)
    frame: Frame | None = None
    error: BaseException | None = None
    slot: ExitSlot | None = None
    abandoned: bool = False


def remote_error(frame: Frame) -> RemoteError:
    """The RemoteError an ERROR frame describes."""
    type_name, message, remote_traceback = pickle.loads(frame.payload[SEQ.size :])
    return RemoteError(type_name, message, remote_traceback)


def kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


@attrs.define(eq=False)
class Channel:
    """Commands to a template, and its replies and exit reports."""

    _sock: socket.socket
    name: str
    _sent: int = 0
    _ready: Reply | None = None
    _replies: dict[int, Reply] = attrs.field(factory=dict)
    _exits: dict[int, ExitSlot] = attrs.field(factory=dict)
    _outbox: deque[Segment] = attrs.field(factory=deque)
    _wake_writer: anyio.Event = attrs.field(factory=anyio.Event)
    _writer_busy: bool = False
    _broken: BrokenTemplateError | None = None
    _closed: bool = False
    _running: bool = False
    _handed_over: bool = False
    # Set, if someone waits in hand_over(), whenever a reply or exit report arrives.
    _progress: anyio.Event | None = None

    def __attrs_post_init__(self) -> None:
        self._sock.setblocking(False)

    def expect_ready(self) -> Reply:
        """Where the READY of a template being started arrives."""
        self._ready = Reply()
        return self._ready

    def command(
        self, op: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
    ) -> Reply:
        """Send a command that is answered; the channel owns ``fds`` and closes them."""
        seq = self._queue(op, payload, fds)
        reply = self._replies[seq] = Reply()
        if op == FORK:
            reply.slot = self._exits[seq] = ExitSlot()
        self._flush()
        return reply

    def spawn(self, payload: bytes, fds: list[int]) -> tuple[int, ExitSlot]:
        """Send SPAWN: its sequence number, and the slot where its end is reported."""
        seq = self._queue(SPAWN, payload, fds)
        slot = self._exits[seq] = ExitSlot()
        self._flush()
        return seq, slot

    def kill(self, seq: int) -> None:
        """Have the template SIGKILL what command ``seq`` made, if it still lives."""
        if seq in self._exits and not self._closed and self._broken is None:
            self._queue(KILL, SEQ.pack(seq), ())
            self._flush()

    def _queue(self, op: int, payload: bytes, fds: list[int] | tuple[int, ...]) -> int:
        # What waits for the answer must be registered before the flush: a flush that
        # finds the template dead fails everything registered, at once.
        if self._closed or self._broken is not None or self._handed_over:
            close_all(list(fds))
            self.check()
        seq = self._sent
        self._sent += 1
        self._outbox.extend(encode(op, payload, fds))
        return seq

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
        """Pid, pidfd and exit slot of the template a FORK command made."""
        frame = await self.wait(reply)
        assert reply.slot is not None
        if frame.fds_lost:
            raise OSError(
                "the pidfd of a new process was lost in transit: the kernel truncated the "
                "control message (is RLIMIT_NOFILE too low?)"
            )
        (pid,) = PID.unpack_from(frame.payload, SEQ.size)
        return pid, frame.fds[0], reply.slot

    def _flush(self) -> None:
        if self._writer_busy:
            return  # the writer task has the socket until it has room again
        if not self._send_queued():
            self._writer_busy = True
            self._wake_writer.set()

    def _send_queued(self) -> bool:
        """Send what is queued; False if the socket is full."""
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                sent = self._sock.sendmsg([data], ancillary(fds))
            except BlockingIOError:
                return False
            except OSError as exc:
                self._break(exc)
                return True
            close_all(fds)
            if sent < len(data):
                self._outbox[0] = (data[sent:], [])
            else:
                self._outbox.popleft()
        return True

    async def run(self) -> None:
        """Read replies and flush writes until the channel is closed or breaks.

        Not cancellable: when the block that owns the template is cancelled, the
        blocks nested in it still need this channel while they clean up (the exits
        of their children and templates are reported here). :meth:`close` ends it.
        """
        self._running = True
        try:
            with anyio.CancelScope(shield=True):
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
            if self._closed:
                return
            self._wake_writer = anyio.Event()
            while self._broken is None:
                try:
                    await anyio.wait_writable(self._sock)
                except anyio.ClosedResourceError:
                    return
                if self._send_queued():
                    break
            self._writer_busy = False

    async def _read(self) -> None:
        reader = FrameReader()
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
            # Also when this task is cancelled in spite of the shield in run(): asyncio
            # cancels every task it finds when asyncio.run() ends, and the exits this
            # channel would have reported must not be waited for, forever, by blocks
            # cleaning up in those tasks (they fall back to the pidfd).
            if not self._closed:
                self._break(cause)

    def _dispatch(self, frame: Frame) -> None:
        if self._progress is not None:
            self._progress.set()
        if frame.op == READY and self._ready is not None:
            ready, self._ready = self._ready, None
            self._deliver(ready, frame)
            return
        if frame.op == EXITED:
            seq, code = EXIT_STATUS.unpack(frame.payload)
            slot = self._exits.pop(seq, None)
            if slot is not None:
                slot.code = code
                slot.event.set()
            return
        (seq,) = SEQ.unpack_from(frame.payload)
        reply = self._replies.pop(seq, None)
        if frame.op == ERROR:
            # No process was made: nothing will be reported for it.
            slot = self._exits.pop(seq, None)
            if reply is None and slot is not None:
                slot.error = remote_error(frame)
                slot.event.set()
                return
        if reply is None:
            _discard(frame)
            self._break(None, f"{self.name} sent an unexpected reply")
            return
        self._deliver(reply, frame)

    def _deliver(self, reply: Reply, frame: Frame) -> None:
        if reply.abandoned:
            _discard(frame)
        else:
            reply.frame = frame
            reply.event.set()

    def _break(self, cause: BaseException | None, message: str | None = None) -> None:
        if self._broken is not None:
            return
        error = BrokenTemplateError(message or f"{self.name} died or its channel broke")
        error.__cause__ = cause
        self._broken = error
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        waiting = list(self._replies.values())
        if self._ready is not None:
            waiting.append(self._ready)
        for reply in waiting:
            reply.error = error
            reply.event.set()
        for slot in self._exits.values():
            slot.event.set()
        self._ready = None
        self._replies.clear()
        self._exits.clear()
        while self._outbox:
            close_all(self._outbox.popleft()[1])
        if self._progress is not None:
            self._progress.set()

    async def hand_over(self) -> socket.socket:
        """Stop using the channel, and return a copy of its socket for a new owner.

        Refuses new commands at once, then waits until every command already sent
        has been answered and every process made through the channel has been
        reported: from then on the template sends nothing unasked, so the new owner
        starts at a frame boundary, owed nothing of ours. If cancelled while
        waiting, the channel stays ours and usable.
        """
        self.check()
        self._handed_over = True
        try:
            while self._replies or self._exits or self._ready is not None:
                self._check_alive()
                self._progress = anyio.Event()
                await self._progress.wait()
            self._check_alive()
        except BaseException:
            self._handed_over = False
            raise
        finally:
            self._progress = None
        sock = self._sock.dup()
        self.close()
        return sock

    def close(self) -> None:
        """Close our end: the template sees end of file and shuts down."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(anyio.ClosedResourceError(f"{self.name} is closed"))
        self._wake_writer.set()
        anyio.notify_closing(self._sock)
        # While run() unwinds, the descriptor must stay ours: on asyncio, a waiter
        # woken by notify_closing unregisters its descriptor number when it resumes,
        # and would unregister a new socket that reused the number (anyio 4.16).
        if not self._running:
            self._sock.close()


def _discard(frame: Frame) -> None:
    # A reply nobody waits for any more: a template forked for it must not live on.
    if frame.op == FORKED:
        for pidfd in frame.fds:
            kill_pidfd(pidfd)
    close_all(frame.fds)


async def _receive_into(sock: socket.socket, data: bytearray, size: int, fds: list[int]) -> bool:
    """Receive until ``data`` holds ``size`` bytes, never more; False at end of file."""
    while len(data) < size:
        try:
            chunk, ancdata, _, _ = sock.recvmsg(
                size - len(data), ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        fds.extend(parse_ancillary(ancdata))
        if not chunk:
            return False
        data += chunk
    return True


async def receive_frame(sock: socket.socket) -> Frame | None:
    """One frame, reading no byte past it; None at end of file before it.

    For the first frame a new child sends on its own socket, before its target runs
    and starts using the socket for itself.
    """
    data = bytearray()
    fds: list[int] = []
    try:
        # Every first frame is at least this long (STARTED is exactly): one recvmsg.
        if not await _receive_into(sock, data, HEADER.size + PID.size, fds):
            if data:
                raise ConnectionResetError("end of file in the middle of a frame")
            return None
        op, nfds, length = HEADER.unpack_from(data)
        if not await _receive_into(sock, data, HEADER.size + length, fds):
            raise ConnectionResetError("end of file in the middle of a frame")
    except BaseException:
        close_all(fds)
        raise
    if len(fds) != nfds:
        close_all(fds)
        return Frame(op, bytes(data[HEADER.size :]), [], True)
    return Frame(op, bytes(data[HEADER.size :]), fds, False)
