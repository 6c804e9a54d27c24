"""The parent's framed transport: one socket (or pipe pair) that carries frames.

The one place where the parent receives and sends frames: the worker side's
:class:`~trio_fork.worker._wire.FrameReader` and :class:`~trio_fork.worker._wire.Outbox`
over a non-blocking descriptor, with the waits of the running event loop. Its users
(a template's :class:`~trio_fork._channel.Channel`, an RPC worker's
:class:`~trio_fork._connection.Connection`) decide what a broken transport means.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import anyio
import attrs

from .worker import _wire

_LENGTH = struct.Struct("<I")


class ProtocolError(Exception):
    """The other side sent something that is not a frame of this protocol."""


def unpack_strings(payload: bytes, count: int) -> list[str | bytes]:
    """``count`` strings of :func:`pack_strings`, then bytes; or ProtocolError."""
    fields: list[str | bytes] = []
    offset = 0
    try:
        while offset < len(payload):
            (length,) = _LENGTH.unpack_from(payload, offset)
            data = payload[offset + 4 : offset + 4 + length]
            offset += 4 + length
            fields.append(data.decode() if len(fields) < count else data)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed fields: {exc}") from None
    if len(fields) < count or offset != len(payload):
        raise ProtocolError(f"expected {count} fields")
    return fields


class _PipeWriter:
    """What :meth:`Outbox.flush` needs of a socket, on a pipe: bytes only."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: Any) -> int:
        return os.write(self.fd, data)

    def sendmsg(self, buffers: list[Any], ancdata: object = ()) -> int:
        return os.writev(self.fd, buffers)


@attrs.define(eq=False)
class Transport:
    """Frames in and out of one channel, never blocking.

    ``sock`` is a Unix stream socket, which carries descriptors; ``pipes`` a pair of
    descriptors (read, write) that carry bytes only: :meth:`send` refuses frames
    with descriptors there.
    """

    sock: socket.socket | None = None
    pipes: tuple[int, int] | None = None
    reader: _wire.FrameReader = attrs.field(factory=_wire.FrameReader)
    outbox: _wire.Outbox = attrs.field(factory=_wire.Outbox)
    _writer: Any = None

    def __attrs_post_init__(self) -> None:
        if self.sock is not None:
            self.sock.setblocking(False)
            self._writer = self.sock
        else:
            assert self.pipes is not None
            for fd in self.pipes:
                os.set_blocking(fd, False)
            self._writer = _PipeWriter(self.pipes[1])

    @property
    def carries_fds(self) -> bool:
        return self.sock is not None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else self.pipes[0]  # type: ignore[index]

    def receive(self, fds: bool = True) -> int:
        """Receive what has come; 0 at end of file.

        Raises:
            BlockingIOError: Nothing has come.
            OSError: The channel broke.
        """
        if self.sock is not None:
            return self.reader.receive(self.sock, fds=fds)
        return self.reader.receive_fd(self.pipes[0])  # type: ignore[index]

    def next_frame(self) -> _wire.Frame | None:
        return self.reader.next_frame()

    def pending_header(self) -> tuple[int, int, int, int] | None:
        """The header of the frame being received (op, nfds, id, length), if it has come.

        So that a peer that sends what is not a frame of ours is found out when the
        header arrives, not never: a lying header announces a payload that may never
        come. (It reads the reader's buffer, which the worker side keeps minimal.)
        """
        reader = self.reader
        start = reader._start
        if reader._end - start < _wire.HEADER.size:
            return None
        op, nfds, id, length = _wire.HEADER.unpack_from(reader._buffer, start)
        return op, nfds, id, length

    def check_fds(self, fds: list[int] | tuple[int, ...]) -> None:
        """Raise unless this channel can carry ``fds`` (checked before anything is sent)."""
        if fds and not self.carries_fds:
            raise TypeError(
                "this template's channel cannot carry file descriptors (it is a byte stream, "
                "such as an ssh connection)"
            )

    def put(self, segments: list[_wire.Segment]) -> None:
        """Queue a frame's segments, to be sent by :meth:`flush`."""
        self.outbox.put(segments)

    def flush(self) -> bool:
        """Send what the channel takes now; whether the queue is empty.

        Raises:
            OSError: The channel broke (the queue is cleared).
        """
        try:
            return self.outbox.flush(self._writer)
        except OSError:
            self.outbox.clear()
            raise

    async def wait_readable(self) -> None:
        await anyio.wait_readable(self.fileno())

    async def wait_writable(self) -> None:
        fd = self.sock if self.sock is not None else self.pipes[1]  # type: ignore[index]
        await anyio.wait_writable(fd)

    def notify_closing(self) -> None:
        anyio.notify_closing(self.fileno())

    def close(self) -> None:
        self.reader.close()
        self.outbox.clear()
        if self.sock is not None:
            self.sock.close()
        elif self.pipes is not None:
            _wire.close_all(list(self.pipes))
            self.pipes = None


@attrs.define(eq=False)
class FirstFrame:
    """Receives one frame from a socket, reading no byte past it.

    For the first frame on a socket that then changes hands: the STARTED of a new
    child, before its target runs and uses the socket for itself; the READY of a
    template forked on request or adopted. A receive that is cancelled can be
    resumed (call :meth:`receive` again): what had arrived is kept, so a caller
    cleaning up after a cancellation still learns what the other side sent. It owns
    the descriptors received until the frame is handed out; :meth:`close` closes
    them.
    """

    sock: socket.socket
    _data: bytearray = attrs.field(factory=bytearray)
    _fds: list[int] = attrs.field(factory=list)

    async def receive(self) -> _wire.Frame | None:
        """The frame; None at end of file before it.

        Raises:
            ConnectionResetError: End of file in the middle of the frame, or a
                header no first frame has.
        """
        data = self._data
        # Every such frame is at least this long (STARTED is exactly): one recvmsg.
        if not await self._receive_into(_wire.HEADER.size + _wire.PID.size):
            if data:
                raise ConnectionResetError("end of file in the middle of a frame")
            return None
        op, nfds, id, length = _wire.HEADER.unpack_from(data)
        if length > 1 << 20:
            raise ConnectionResetError(f"a first frame of {length} bytes is not one of ours")
        if not await self._receive_into(_wire.HEADER.size + length):
            raise ConnectionResetError("end of file in the middle of a frame")
        payload = bytes(data[_wire.HEADER.size :])
        fds, self._fds = self._fds, []
        if len(fds) != nfds:
            _wire.close_all(fds)
            return _wire.Frame(op, id, payload, [], True)
        return _wire.Frame(op, id, payload, fds, False)

    async def _receive_into(self, size: int) -> bool:
        return await _receive_into(self.sock, self._data, size, self._fds)

    def close(self) -> None:
        _wire.close_all(self._fds)
        self._fds.clear()


async def _receive_into(sock: socket.socket, data: bytearray, size: int, fds: list[int]) -> bool:
    """Receive until ``data`` holds ``size`` bytes, never more; False at end of file.

    What arrives is added to ``data`` and ``fds`` as it comes, so a receive that is
    cancelled can be resumed with the same ``data`` and ``fds``.
    """
    while len(data) < size:
        try:
            chunk, ancdata, _, _ = sock.recvmsg(
                size - len(data), socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        fds.extend(_wire.parse_ancillary(ancdata))
        if not chunk:
            return False
        data += chunk
    return True


async def receive_frame(sock: socket.socket) -> _wire.Frame | None:
    """One frame, reading no byte past it (see :class:`FirstFrame`); None at end of file."""
    first = FirstFrame(sock)
    try:
        return await first.receive()
    finally:
        first.close()
