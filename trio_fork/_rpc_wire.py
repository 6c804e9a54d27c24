"""The RPC wire format, spoken over a child's stream by the parent and an RPC worker.

Standard library only: this module is loaded into templates, and so into every
worker forked from them.

A frame is a fixed header (kind, call id, payload length) followed by the payload.
Calls carry ids chosen by the parent, and every reply names the call it belongs to,
so a worker that serves many calls at once can answer them in any order. Lengths are
64-bit: an argument or a result is limited by memory, not by the format.
"""

from __future__ import annotations

import socket
import struct
import traceback

HEADER = struct.Struct("<BIQ")
"""Kind, call id, payload length."""

RECEIVE_SIZE = 256 * 1024
# Below this size a frame is sent as one joined buffer; above it, header and payload
# go out as separate buffers of one sendmsg, so that a big payload is never copied.
JOIN_LIMIT = 64 * 1024

# Parent to worker.
CALL = 1
CANCEL = 2

# Worker to parent.
READY = 16
"""The worker has run its init function; the payload is a pickled dict of facts."""
FAILED = 17
"""The worker could not start (bad function, init raised); a pickled error follows."""
RESULT = 18
ERROR = 19
"""A call raised; the payload is a pickled :func:`describe` tuple."""
EVENT = 20
CANCELLED = 21
"""A call was cancelled, or dropped before it started, at the parent's request."""
RETIRING = 22
"""The worker exits once this frame and the reply after it are sent: no more calls."""


def encode(kind: int, call_id: int, payload: bytes = b"") -> list[bytes]:
    """The buffers of one frame, ready for ``sendmsg``."""
    header = HEADER.pack(kind, call_id, len(payload))
    if len(payload) <= JOIN_LIMIT:
        return [header + payload]
    return [header, payload]


def send_blocking(sock: socket.socket, buffers: list[bytes]) -> None:
    """Send whole buffers on a blocking socket."""
    if len(buffers) == 1:
        sock.sendall(buffers[0])
        return
    pending = [memoryview(buffer) for buffer in buffers]
    while pending:
        sent = sock.sendmsg(pending)
        while sent:
            if sent >= len(pending[0]):
                sent -= len(pending.pop(0))
            else:
                pending[0] = pending[0][sent:]
                sent = 0


class FrameDecoder:
    """Reassembles frames from a byte stream.

    Bytes are received straight into the decoder's buffer, which grows to hold the
    frame being received whole, so a payload of any size is copied once: out of the
    buffer, when its frame is complete.
    """

    def __init__(self) -> None:
        self._buffer = bytearray(RECEIVE_SIZE)
        self._start = 0
        self._end = 0

    def receive(self, sock: socket.socket, flags: int = 0) -> int:
        """Receive once from ``sock``; the number of bytes, 0 at end of file.

        Raises :exc:`BlockingIOError` when a non-blocking receive finds nothing.
        """
        if len(self._buffer) - self._end < RECEIVE_SIZE:
            self._make_room()
        with memoryview(self._buffer) as view:
            count = sock.recv_into(view[self._end :], 0, flags)
        self._end += count
        return count

    def next_frame(self) -> tuple[int, int, bytes] | None:
        """The next complete frame as ``(kind, call_id, payload)``, or None."""
        available = self._end - self._start
        if available < HEADER.size:
            return None
        kind, call_id, length = HEADER.unpack_from(self._buffer, self._start)
        end = self._start + HEADER.size + length
        if end > self._end:
            return None
        payload = bytes(self._buffer[self._start + HEADER.size : end]) if length else b""
        self._start = end
        if self._start == self._end:
            self._start = self._end = 0
        return kind, call_id, payload

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return self._end - self._start

    def _make_room(self) -> None:
        wanted = RECEIVE_SIZE
        if self._end - self._start >= HEADER.size:
            _, _, length = HEADER.unpack_from(self._buffer, self._start)
            wanted = max(wanted, HEADER.size + length - (self._end - self._start))
        if len(self._buffer) - self._end >= wanted:
            return
        live = self._end - self._start
        if self._start:
            self._buffer[:live] = self._buffer[self._start : self._end]
            self._start, self._end = 0, live
        if len(self._buffer) - live < wanted:
            self._buffer.extend(bytes(live + wanted - len(self._buffer)))


def describe(exc: BaseException, skip: int = 0) -> tuple[str, str, str]:
    """The type name, message and formatted traceback of ``exc``.

    ``skip`` drops that many outer frames: the worker's own, above the user's code.
    """
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is None:
            break
        tb = tb.tb_next
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__", "__mp_main__"):
        name = f"{cls.__module__}.{name}"
    text = "".join(traceback.format_exception(cls, exc, tb))
    return name, str(exc), text
