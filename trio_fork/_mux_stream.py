"""One stream of a remote template's mux, at the parent: bridged to a local socket, or direct.

Each stream of the mux (:mod:`._mux`) is handed to its user as one end of a local
socketpair, so that a template's channel and a child's stream work as a local
template's do; the bridge here moves bytes between the other end and the mux's DATA
frames, within the stream's window each way (credits). That costs, per message and
per direction, a send and a receive on the socketpair and a wake-up of a task,
which is most of the parent's time in a remote RPC call. So a user that speaks
frames itself (an RPC worker's :class:`~trio_fork._connection.Connection`) may take
the stream over: :func:`take_over` gives it a :class:`Stream` that reads
and writes the mux directly, through the methods a socket offers
:class:`~trio_fork.worker._wire.Outbox` and
:class:`~trio_fork.worker._wire.FrameReader` (``send``, ``sendmsg``, ``recv_into``).
The socket stays, for what closing it means: end of file to the far end.
"""

from __future__ import annotations

import errno
import socket
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from .worker import _relay
from .worker._relay import CHUNK, COUNT, MAX_FRAME, WINDOW

if TYPE_CHECKING:
    from ._mux import Mux


# The user's end of each stream's socketpair, to its stream: a socket of a subclass
# would be refused by trio (and by anyio on trio), so the socket is a plain one.
_streams_of: weakref.WeakKeyDictionary[socket.socket, Stream] = weakref.WeakKeyDictionary()


def bridge(stream: Stream, theirs: socket.socket) -> None:
    """Make ``theirs``, the user's end of the socketpair, one that may be taken over."""
    _streams_of[theirs] = stream


def take_over(sock: socket.socket, notify: Callable[[], None]) -> Stream | None:
    """The stream of ``sock`` to read and write directly from now on; None if it has none.

    See the module's docstring. ``notify`` is called (synchronously) whenever data or
    the end of the stream has come. Closing ``sock``, or shutting its writes, still
    sends end of file.
    """
    stream = _streams_of.pop(sock, None)
    return None if stream is None else stream.take_over(sock, notify)


@attrs.define(eq=False)
class Stream:
    """One stream of the mux: its windows, and its bridge or its direct user."""

    id: int
    mux: Mux
    sock: socket.socket  # our end of the socketpair
    credit: int = WINDOW  # what we may still send the relay
    owed: int = 0  # what the relay sent and we have not credited yet
    taken: int = 0  # of that, what is in the socket (or was read directly) already
    pending: deque[memoryview] = attrs.field(factory=deque)  # from the relay, not taken yet
    sent_end: bool = False  # we sent EOF or CLOSE: the local end is read to the end
    got_end: bool = False  # the relay sent EOF or CLOSE: nothing more comes
    closed: bool = False  # the relay's reader is gone: what we send is lost
    direct: Callable[[], None] | None = None  # the user that took the stream over
    credited: anyio.Event = attrs.field(factory=anyio.Event)
    arrived: anyio.Event = attrs.field(factory=anyio.Event)
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)

    # What the relay sent (see Mux._dispatch) -----------------------------------------

    def on_data(self, payload: bytes) -> None:
        if self.got_end:
            return  # for a stream we closed: it was on its way
        self.owed += len(payload)
        if self.owed > WINDOW or len(payload) > MAX_FRAME:
            raise ValueError(f"stream {self.id} overran its window")
        self.pending.append(memoryview(payload))
        if self.direct is not None:
            self.direct()
            return
        if len(self.pending) == 1:
            self._push()
        if self.pending:
            self.arrived.set()

    def on_credit(self, count: int) -> None:
        self.credit += count
        # Every waiter wakes: the bridge's pump and a direct user's writer alike.
        self.credited.set()
        self.credited = anyio.Event()

    def on_end(self, close: bool) -> None:
        if self.got_end:
            return
        self.got_end = True
        if close:
            # Its reader is gone: writes to our end now fail, as to a local child's.
            self.closed = True
            if self.direct is None:
                self.pending.clear()
                try:
                    self.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            self.on_credit(0)
        if self.direct is not None:
            self.direct()
        else:
            self.arrived.set()
            if not self.pending:
                self._push()

    # The bridge ------------------------------------------------------------------------

    async def serve(self) -> None:
        with self.scope:
            try:
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._deliver)
                    await self._pump()
                    # Read to the end: the other way may still carry data.
                    await anyio.sleep_forever()
            finally:
                self.mux.forget(self)
                self.sock.close()
                if not self.got_end:
                    self.got_end = self.closed = True
                    if self.direct is not None:
                        self.direct()  # the end, as a closed socket would say

    async def _pump(self) -> None:
        """Our end's data to the relay, within the credit it gave.

        Once the stream is taken over, only end of file comes this way (the user
        closed its socket), or data it sent before.
        """
        sock = self.sock
        mux = self.mux
        while True:
            while self.credit <= 0 or mux.queue_full:
                if self.credit <= 0:
                    await self.credited.wait()
                else:
                    await mux.drained.wait()
            try:
                data = sock.recv(min(self.credit, CHUNK))
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            except OSError:
                data = b""
            if not data:
                self.sent_end = True
                mux.send(_relay.EOF, self.id)
                self._maybe_done()
                return
            self.credit -= len(data)
            mux.send(_relay.DATA, self.id, data)

    async def _deliver(self) -> None:
        """What the relay sent, into our end, when the socket would not take it at once."""
        while self.direct is None:
            while not self.pending:
                if self.got_end or self.direct is not None:
                    return
                self.arrived = anyio.Event()
                await self.arrived.wait()
            try:
                await anyio.wait_writable(self.sock)
            except anyio.ClosedResourceError:
                return
            if self.direct is None:
                self._push()

    def _push(self) -> None:
        """Move pending data into the socket, as far as it takes it now."""
        pending = self.pending
        try:
            while pending:
                sent = self.sock.send(pending[0])
                self.taken += sent
                if sent < len(pending[0]):
                    pending[0] = pending[0][sent:]
                    break
                pending.popleft()
        except BlockingIOError:
            pass
        except OSError:  # nobody reads our end any more: the relay must stop sending
            pending.clear()
            if not self.got_end:
                self.got_end = True
                self.mux.send(_relay.CLOSE, self.id)
            self._maybe_done()
            return
        self._credit_back()
        if not pending and self.got_end:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_done()

    def _credit_back(self) -> None:
        # Not for every write (see the relay): a sender out of credit has sent a
        # whole window, so a quarter of it is always taken in the end.
        if self.taken >= WINDOW // 4:
            self.owed -= self.taken
            self.mux.send(_relay.CREDIT, self.id, COUNT.pack(self.taken))
            self.taken = 0

    def _maybe_done(self) -> None:
        if self.sent_end and self.got_end and not self.pending:
            self.scope.cancel()

    # Direct use ------------------------------------------------------------------------

    def take_over(self, theirs: socket.socket, notify: Callable[[], None]) -> Stream:
        if self.direct is not None:
            raise RuntimeError(f"stream {self.id} was taken over already")
        # What the bridge moved into the socketpair and the user has not read comes
        # first, then what it had not moved yet.
        received = []
        while True:
            try:
                data = theirs.recv(WINDOW, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not data:
                break
            received.append(memoryview(data))
        self.pending.extendleft(reversed(received))
        self.direct = notify
        self.arrived.set()  # the bridge's delivery ends
        return self

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Copy what has come into ``buffer``; 0 at the end, BlockingIOError if nothing."""
        pending = self.pending
        if not pending:
            if self.got_end:
                self._maybe_done()
                return 0
            raise BlockingIOError(errno.EAGAIN, "nothing has come")
        room = len(buffer) if not nbytes else min(nbytes, len(buffer))
        count = 0
        while pending and count < room:
            head = pending[0]
            part = min(len(head), room - count)
            buffer[count : count + part] = head[:part]
            count += part
            if part == len(head):
                pending.popleft()
            else:
                pending[0] = head[part:]
        self.taken += count
        self._credit_back()
        return count

    def send(self, data: Any) -> int:
        """Send what the window and the mux's queue allow now, as one DATA frame."""
        if self.closed or self.sent_end or self.mux.broken is not None:
            raise BrokenPipeError(errno.EPIPE, f"stream {self.id} is closed")
        count = min(len(data), self.credit, CHUNK)
        if count <= 0 or self.mux.queue_full:
            raise BlockingIOError(errno.EAGAIN, "no credit")
        self.credit -= count
        self.mux.send(_relay.DATA, self.id, bytes(data[:count]))
        return count

    def sendmsg(self, buffers: list[Any], ancdata: object = (), *_: object) -> int:
        if ancdata:
            raise OSError(errno.EINVAL, "a stream of an ssh connection carries no descriptors")
        # Only what one frame may carry is joined: a batch may hold a payload of GiBs.
        limit = min(self.credit, CHUNK)
        parts = []
        size = 0
        for buffer in buffers:
            if size >= limit:
                break
            part = memoryview(buffer)[: limit - size]
            parts.append(part)
            size += len(part)
        return self.send(b"".join(parts))

    async def wait_writable(self) -> None:
        """Wait until :meth:`send` may take something (or would fail)."""
        mux = self.mux
        while not (self.closed or self.sent_end or mux.broken is not None):
            if self.credit <= 0:
                await self.credited.wait()
            elif mux.queue_full:
                await mux.drained.wait()
            else:
                return
