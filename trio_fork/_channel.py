"""The parent's end of a template's command channel.

Commands are numbered in the order they are sent, and the number travels as the
frame's id; a template answers them one at a time, in order, each reply carrying the
id of its command, so a command may also go unanswered: a SPAWN that works is
confirmed by the child itself. Commands are written as soon as they are issued: a
frame goes into the transport's write queue whole, and the queue is flushed on the
spot when the channel has room (nearly always), or by the writer task when it has
not. A caller cancelled while waiting for its reply therefore never leaves half a
frame behind; its reply is discarded when it arrives, and a process made for it is
killed.
"""

from __future__ import annotations

import signal
import socket
import struct

import anyio
import anyio.lowlevel
import attrs

from ._errors import BrokenTemplateError, RemoteError
from ._process import signal_pidfd
from ._transport import ProtocolError, Transport, unpack_strings
from .worker import _wire

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
    frame: _wire.Frame | None = None
    error: BaseException | None = None
    slot: ExitSlot | None = None
    abandoned: bool = False


def remote_error(frame: _wire.Frame) -> RemoteError:
    """The RemoteError an ERROR frame describes.

    Raises:
        ProtocolError: The payload is not a description.
    """
    type_name, message, remote_traceback = unpack_strings(frame.payload, 3)[:3]
    return RemoteError(str(type_name), str(message), str(remote_traceback))


@attrs.define(eq=False)
class Channel:
    """Commands to a template, and its replies and exit reports."""

    _transport: Transport
    name: str
    _sent: int = 1  # ids count from 1: 0 is a template's unasked READY
    _ready: Reply | None = None
    _replies: dict[int, Reply] = attrs.field(factory=dict)
    _exits: dict[int, ExitSlot] = attrs.field(factory=dict)
    _wake_writer: anyio.Event = attrs.field(factory=anyio.Event)
    _writer_busy: bool = False
    _broken: BrokenTemplateError | None = None
    _closed: bool = False
    _running: bool = False
    _handed_over: bool = False
    # Set, if someone waits in hand_over(), whenever a reply or exit report arrives.
    _progress: anyio.Event | None = None

    @property
    def carries_fds(self) -> bool:
        return self._transport.carries_fds

    def expect_ready(self) -> Reply:
        """Where the READY of a template being started arrives."""
        self._ready = Reply()
        return self._ready

    def command(
        self, op: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
    ) -> Reply:
        """Send a command that is answered; the channel owns ``fds`` and closes them."""
        id = self._queue(op, payload, fds)
        reply = self._replies[id] = Reply()
        if op == _wire.FORK:
            reply.slot = self._exits[id] = ExitSlot()
        self._flush()
        return reply

    def spawn(self, payload: bytes, fds: list[int]) -> tuple[int, ExitSlot]:
        """Send SPAWN: its id, and the slot where its end is reported."""
        id = self._queue(_wire.SPAWN, payload, fds)
        slot = self._exits[id] = ExitSlot()
        self._flush()
        return id, slot

    def kill(self, id: int) -> None:
        """Have the template SIGKILL what command ``id`` made, if it still lives.

        Also while a hand-over waits: cleaning up after a command already sent is
        part of finishing it, which is what the hand-over waits for.
        """
        if id in self._exits and not self._closed and self._broken is None:
            self._transport.put(_wire.encode(_wire.KILL, id))
            self._flush()

    def _queue(self, op: int, payload: bytes, fds: list[int] | tuple[int, ...]) -> int:
        # What waits for the answer must be registered before the flush: a flush that
        # finds the template dead fails everything registered, at once.
        try:
            self.check()
            segments = _wire.encode(op, self._sent, payload, fds)
        except BaseException:
            _wire.close_all(list(fds))
            raise
        id = self._sent
        self._sent = (self._sent + 1) & 0xFFFFFFFF or 1
        self._transport.put(segments)
        return id

    def check(self) -> None:
        """Raise if the channel can no longer carry commands."""
        if self._handed_over:
            raise anyio.ClosedResourceError(f"{self.name} was handed over to another owner")
        if self._closed:
            raise anyio.ClosedResourceError(f"{self.name} is closed")
        if self._broken is not None:
            raise BrokenTemplateError(str(self._broken)) from self._broken.__cause__

    async def wait(self, reply: Reply) -> _wire.Frame:
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
        if reply.frame.op == _wire.ERROR:
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
        (pid,) = _wire.PID.unpack(frame.payload)
        return pid, frame.fds[0], reply.slot

    def _flush(self) -> None:
        if self._writer_busy:
            return  # the writer task has the channel until it has room again
        try:
            if self._transport.flush():
                return
        except OSError as exc:
            self._break(exc)
            return
        self._writer_busy = True
        self._wake_writer.set()

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
                self._transport.close()

    async def _write(self) -> None:
        while True:
            await self._wake_writer.wait()
            if self._closed:
                return
            self._wake_writer = anyio.Event()
            while self._broken is None:
                try:
                    await self._transport.wait_writable()
                except anyio.ClosedResourceError:
                    return
                try:
                    if self._transport.flush():
                        break
                except OSError as exc:
                    self._break(exc)
            self._writer_busy = False

    async def _read(self) -> None:
        transport = self._transport
        cause: BaseException | None = None
        message: str | None = None
        try:
            streak = 0
            while True:
                try:
                    if not transport.receive():
                        if transport.reader.in_frame:
                            message = f"{self.name} sent a frame cut short"
                        break
                except BlockingIOError:
                    streak = 0
                    try:
                        await transport.wait_readable()
                    except anyio.ClosedResourceError:
                        return
                    continue
                while (frame := transport.next_frame()) is not None:
                    self._dispatch(frame)
                _check_pending(transport)
                streak += 1
                if streak == _FAIRNESS:
                    streak = 0
                    await anyio.lowlevel.checkpoint()
        except (ProtocolError, struct.error) as exc:
            cause, message = exc, f"{self.name} broke the protocol: {exc}"
        except OSError as exc:
            cause = exc
        finally:
            # Also when this task is cancelled in spite of the shield in run(): asyncio
            # cancels every task it finds when asyncio.run() ends, and the exits this
            # channel would have reported must not be waited for, forever, by blocks
            # cleaning up in those tasks (they fall back to the pidfd).
            if not self._closed:
                self._break(cause, message)

    def _dispatch(self, frame: _wire.Frame) -> None:
        if self._progress is not None:
            self._progress.set()
        op = frame.op
        if op == _wire.READY and frame.id == 0 and self._ready is not None:
            ready, self._ready = self._ready, None
            self._deliver(ready, frame)
            return
        if op == _wire.EXITED:
            (code,) = _wire.EXIT_STATUS.unpack(frame.payload)
            slot = self._exits.pop(frame.id, None)
            if slot is not None:
                slot.code = code
                slot.event.set()
            return
        if op not in (_wire.OK, _wire.ERROR, _wire.FORKED, _wire.READY):
            _discard(frame)
            raise ProtocolError(f"unknown frame {op}")
        reply = self._replies.pop(frame.id, None)
        if op == _wire.ERROR:
            # No process was made: nothing will be reported for it.
            slot = self._exits.pop(frame.id, None)
            if reply is None and slot is not None:
                slot.error = remote_error(frame)
                slot.event.set()
                return
        if reply is None:
            _discard(frame)
            raise ProtocolError("a reply to no command")
        self._deliver(reply, frame)

    def _deliver(self, reply: Reply, frame: _wire.Frame) -> None:
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
        self._transport.outbox.clear()
        if self._progress is not None:
            self._progress.set()

    async def hand_over(self) -> socket.socket:
        """Stop using the channel, and return its transport for a new owner.

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
        assert self._transport.sock is not None
        sock = self._transport.sock.dup()
        self.close()
        return sock

    def _check_alive(self) -> None:
        if self._broken is not None:
            raise BrokenTemplateError(str(self._broken)) from self._broken.__cause__

    def close(self) -> None:
        """Close our end: the template sees end of file and shuts down."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(anyio.ClosedResourceError(f"{self.name} is closed"))
        self._wake_writer.set()
        self._transport.notify_closing()
        # While run() unwinds, the descriptor must stay ours: on asyncio, a waiter
        # woken by notify_closing unregisters its descriptor number when it resumes,
        # and would unregister a new socket that reused the number (anyio 4.16).
        if not self._running:
            self._transport.close()


# What a template may send: opcode -> (most descriptors, payload size or None: any).
_FROM_TEMPLATE = {
    _wire.READY: (1, _wire.IDENTITY.size),
    _wire.OK: (0, 0),
    _wire.ERROR: (0, None),
    _wire.FORKED: (1, _wire.PID.size),
    _wire.EXITED: (0, _wire.EXIT_STATUS.size),
}


def _check_pending(transport: Transport) -> None:
    """Refuse a frame as soon as its header shows it is not one a template sends.

    Its payload may never come: waiting for it would leave every command hanging.
    """
    header = transport.pending_header()
    if header is None:
        return
    op, nfds, _, length = header
    if op not in _FROM_TEMPLATE:
        raise ProtocolError(f"unknown frame {op}")
    most_fds, size = _FROM_TEMPLATE[op]
    if nfds > most_fds or (size is not None and length != size):
        raise ProtocolError(f"a frame {op} with {nfds} descriptors and {length} bytes")


def _discard(frame: _wire.Frame) -> None:
    # A reply nobody waits for any more: a template forked for it must not live on.
    if frame.op == _wire.FORKED:
        for pidfd in frame.fds:
            signal_pidfd(pidfd, signal.SIGKILL)
    _wire.close_all(frame.fds)
