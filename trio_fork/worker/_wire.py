"""The one wire format of every trio_fork channel, and its framed I/O. Stdlib only.

A frame is a header (opcode, number of descriptors, id, 64-bit payload length) and a
payload. A command's id is its sequence number, echoed by its reply and by the exit
report of the process it made; an RPC call's id names its result, error and events.
Descriptors ride as ``SCM_RIGHTS`` on the frame's own bytes, at most 253 per
``sendmsg``. Linux returns at most one fd-carrying message per ``recvmsg`` and stops
right after it, so the descriptors of one ``recvmsg`` belong to the frame that holds
its last byte: that is how :class:`FrameReader` hands each frame its own, and sees
when the kernel dropped some (``MSG_CTRUNC``). What a worker sends to the parent is
data, never a pickle: errors as strings (:func:`pack_strings`), facts as structs.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections import deque
from itertools import islice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

HEADER = struct.Struct("<BIIQ")  # opcode, number of descriptors, id, payload length
MAX_FDS_PER_MESSAGE = 253  # the kernel's SCM_MAX_FD: descriptors in one sendmsg
RECEIVE_SIZE = 256 * 1024
# Below this size a frame is sent as one joined buffer; above it header and payload
# go out as separate buffers of one sendmsg, so that a big payload is never copied.
_JOIN_LIMIT = 64 * 1024
# The most buffers handed to one sendmsg (the kernel's limit is 1024).
_MAX_BUFFERS = 512
_FD = struct.Struct("i")
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD.size)
_LENGTH = struct.Struct("<I")
# Plain ints: the socket module's flags are enum members, whose operators run Python
# code, which would make a receive that may carry descriptors twice as slow.
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)

REQUIRE = 1  # parent to template
EVAL = 2
ARGS = 3
FDS = 4
FORK = 5  # a new template; answered by FORKED
SPAWN = 6  # a child running a target; answered only if it fails, see STARTED
KILL = 7  # SIGKILL what the command whose id this frame carries made; no answer
SERVE_FORKS = 8  # fork a new template per request on the SOCK_SEQPACKET socket sent
HELLO = 9  # answered by READY, with a pidfd; for adopting a channel
INVOKE = 10  # call a function of the worker side in the template: payload (function, args)
CALL = 12  # parent to RPC worker
CANCEL = 13
READY = 16  # template to parent  # payload IDENTITY; unasked (id 0) when a template is up
OK = 17
ERROR = 18  # payload pack_strings(type name, message, traceback, [pickled original])
FORKED = 19  # payload PID, with a pidfd
STARTED = 20  # from a new child, on its own socket: payload PID, with a pidfd
EXITED = 21  # unasked: the process the command with this id made was reaped
WORKER_READY = 22  # RPC worker to parent; payload WORKER
FAILED = 23  # the worker could not start; payload as ERROR
RESULT = 24
EVENT = 25
CANCELLED = 26
RETIRING = 27  # no more calls: the worker exits after the frames it has sent

PID = struct.Struct("<i")
EXIT_STATUS = struct.Struct("<i")  # EXITED: the exit status, -N for death by signal N
IDENTITY = struct.Struct("<iBB")  # READY: pid, major and minor Python version
WORKER = struct.Struct("<i?")  # WORKER_READY: pid, whether calls run concurrently


class Frame:
    """One frame: opcode, id, payload and the descriptors that came with it."""

    __slots__ = ("fds", "fds_lost", "id", "op", "payload")

    def __init__(self, op: int, id: int, payload: bytes, fds: list[int], lost: bool) -> None:
        self.op = op
        self.id = id
        self.payload = payload
        self.fds = fds
        self.fds_lost = lost  # the kernel dropped some of them (MSG_CTRUNC)


Segment = tuple[list[bytes], list[int]]
"""Buffers sent by one ``sendmsg``, with the descriptors that ride on them."""


def encode(op: int, id: int = 0, payload: bytes = b"", fds: Sequence[int] = ()) -> list[Segment]:
    """The ``sendmsg`` calls that carry one frame; one, unless it has over 253 fds."""
    if not fds and len(payload) <= _JOIN_LIMIT:  # most frames: 0.2 us less a call
        return [([HEADER.pack(op, 0, id, len(payload)) + payload], [])]
    nfds = len(fds)
    # Every batch of descriptors needs a byte of its own frame to ride on.
    batches = -(-nfds // MAX_FDS_PER_MESSAGE)
    padding = max(0, batches - HEADER.size - len(payload))
    header = HEADER.pack(op, nfds, id, len(payload) + padding)
    if nfds <= MAX_FDS_PER_MESSAGE:
        if len(payload) <= _JOIN_LIMIT:
            return [([header + payload], list(fds))]
        return [([header, payload], list(fds))]
    frame = memoryview(header + payload + bytes(padding))
    segments: list[Segment] = []
    for index in range(batches):
        chunk = list(fds[index * MAX_FDS_PER_MESSAGE : (index + 1) * MAX_FDS_PER_MESSAGE])
        data = frame[index : index + 1] if index < batches - 1 else frame[index:]
        segments.append(([data], chunk))  # type: ignore[list-item]
    return segments


def ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ``sendmsg`` ancillary data that passes ``fds``."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


def parse_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors received in ``recvmsg`` ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(fd for (fd,) in _FD.iter_unpack(data[: len(data) - len(data) % _FD.size]))
    return fds


def close_all(fds: list[int]) -> None:
    """Close descriptors, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FrameReader:
    """Reassembles frames, and their descriptors, from what a transport receives.

    Bytes land straight in the buffer, so a payload is copied once: out of it, when
    its frame is complete. The buffer grows to hold the frame, but never beyond
    twice what has arrived: a lying header cannot make us allocate what was never
    sent. Descriptors are the reader's until their frame is handed out.
    """

    def __init__(self) -> None:
        self._buffer = bytearray(RECEIVE_SIZE)
        self._start = 0  # first byte not handed out
        self._end = 0  # end of the bytes received
        self._offset = 0  # stream offset of _buffer[0]
        # (stream offset of the last byte received with them, descriptors, truncated)
        self._marks: deque[tuple[int, list[int], bool]] = deque()

    def receive(self, sock: socket.socket, flags: int = 0, fds: bool = True) -> int:
        """Receive once; the number of bytes, 0 at end of file (or BlockingIOError).

        Descriptors arrive close-on-exec; with ``fds=False`` the kernel drops them.
        """
        view = self._room()
        try:
            if not fds:
                count = sock.recv_into(view, 0, flags)
            else:
                count, ancdata, msg_flags, _ = sock.recvmsg_into(
                    [view], _ANCILLARY_SIZE, flags | _CLOEXEC
                )
                if ancdata or msg_flags & _CTRUNC:
                    received = parse_ancillary(ancdata)
                    if not count:
                        close_all(received)
                        return 0
                    mark = self._offset + self._end + count - 1
                    self._marks.append((mark, received, bool(msg_flags & _CTRUNC)))
        finally:
            view.release()
        self._end += count
        return count

    def receive_fd(self, fd: int) -> int:
        """Receive once from a pipe (no descriptors)."""
        view = self._room()
        try:
            count = os.readv(fd, [view])
        finally:
            view.release()
        self._end += count
        return count

    def _room(self) -> memoryview:
        wanted = RECEIVE_SIZE
        pending = self._end - self._start
        if pending >= HEADER.size:
            length = HEADER.unpack_from(self._buffer, self._start)[3]
            wanted = max(wanted, min(HEADER.size + length - pending, pending))
        if len(self._buffer) - self._end < wanted:
            if self._start:
                self._buffer[:pending] = self._buffer[self._start : self._end]
                self._offset += self._start
                self._start, self._end = 0, pending
            if len(self._buffer) - pending < wanted:
                self._buffer.extend(bytes(pending + wanted - len(self._buffer)))
        return memoryview(self._buffer)[self._end :]

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more data arrives."""
        start, stop = self._start, self._end
        if stop - start < HEADER.size:
            return None
        op, nfds, id, length = HEADER.unpack_from(self._buffer, start)
        end = start + HEADER.size + length
        if end > stop:
            return None
        payload = bytes(self._buffer[start + HEADER.size : end]) if length else b""
        stream_end = self._offset + end
        if end == stop:
            self._offset = stream_end
            self._start = self._end = 0
        else:
            self._start = end
        if not (nfds or self._marks):
            return Frame(op, id, payload, [], False)
        fds: list[int] = []
        lost = False
        while self._marks and self._marks[0][0] < stream_end:
            _, received, truncated = self._marks.popleft()
            fds.extend(received)
            lost = lost or truncated
        if lost or len(fds) != nfds:
            close_all(fds)
            return Frame(op, id, payload, [], True)
        return Frame(op, id, payload, fds, False)

    @property
    def pending_fds(self) -> int:
        """Descriptors received and not handed out yet: those of the frame coming."""
        return sum(len(fds) for _, fds, _ in self._marks)

    @property
    def in_frame(self) -> bool:  # part of a frame came: end of file now cuts it
        return self._end > self._start

    def close(self) -> None:
        """Close every descriptor received but not handed out."""
        while self._marks:
            close_all(self._marks.popleft()[1])


class Outbox:
    """The one write queue: frames sent whole and in order, batched, never blocking.

    It owns the descriptors of the frames it holds, and closes them once sent.
    """

    def __init__(self) -> None:
        # Buffers as they came; a memoryview of the first once part of it is sent.
        self._views: deque[bytes | memoryview] = deque()
        self._fds: deque[list[int]] = deque()  # the descriptors riding on each view
        self._carrying = 0  # how many views have descriptors riding on them
        self.size = 0

    def __len__(self) -> int:
        return len(self._views)

    def put(self, segments: list[Segment]) -> None:
        views, carried = self._views, self._fds
        for buffers, fds in segments:
            if fds:
                self._carrying += 1
            for buffer in buffers:
                views.append(buffer)
                carried.append(fds)
                self.size += len(buffer)
                fds = []

    def flush(self, sock: socket.socket) -> bool:
        """Send what the socket takes now; whether nothing is left.

        Raises :exc:`OSError` (never :exc:`BlockingIOError`) if the socket broke.
        """
        views, fds = self._views, self._fds
        while views:
            try:
                if len(views) == 1 and not fds[0]:
                    sent = sock.send(views[0])
                elif not self._carrying:  # pipelined small calls: 0.3 us less a frame
                    sent = sock.sendmsg(list(islice(views, _MAX_BUFFERS)))
                elif fds[0]:
                    sent = sock.sendmsg([views[0]], ancillary(fds[0]))
                    close_all(fds[0])
                    fds[0] = []
                    self._carrying -= 1
                else:
                    batch: list[bytes | memoryview] = []
                    for view, more in zip(views, fds, strict=True):
                        if more or len(batch) == _MAX_BUFFERS:
                            break
                        batch.append(view)
                    sent = sock.sendmsg(batch)
            except BlockingIOError:
                return False
            self.size -= sent
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.popleft())
                    fds.popleft()
                else:
                    views[0] = memoryview(views[0])[sent:]
                    sent = 0
        return True

    def clear(self) -> None:
        for fds in self._fds:
            close_all(fds)
        self._views.clear()
        self._fds.clear()
        self._carrying = 0
        self.size = 0


def send_blocking(sock: socket.socket, segments: list[Segment]) -> None:
    """Send a frame on a blocking socket; its descriptors are closed once sent."""
    if len(segments) == 1 and not segments[0][1] and len(segments[0][0]) == 1:
        sock.sendall(segments[0][0][0])  # most frames: 0.45 us less than through an Outbox
        return
    outbox = Outbox()
    outbox.put(segments)
    try:
        outbox.flush(sock)
    finally:
        outbox.clear()


def report(sock: socket.socket, op: int, exc: BaseException) -> None:
    """Send ``exc`` described in an ERROR or FAILED frame, the last one, if anyone reads."""
    try:
        sock.setblocking(True)
        send_blocking(sock, encode(op, 0, error_payload(exc)))
    except OSError:
        pass


def pack_strings(*fields: str | bytes) -> bytes:
    """Fields, each length-prefixed: how descriptions travel without pickle."""
    parts = []
    for field in fields:
        data = field if isinstance(field, bytes) else field.encode("utf-8", "replace")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def describe(exc: BaseException) -> tuple[str, str, str]:
    """Type name, message and traceback of ``exc`` (from the user's code); never raises."""
    import traceback  # only when something failed: templates stay small

    tb = user_traceback(exc)
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__", "__mp_main__"):
        name = f"{cls.__module__}.{name}"
    try:
        message = _cut(str(exc))
    except BaseException:
        message = f"<exception str() failed: {cls.__name__}>"
    try:
        text = _cut("".join(traceback.format_exception(cls, exc, tb)))
    except BaseException:
        text = f"{name}: {message}\n(the traceback could not be formatted)\n"
    return name, message, text


def user_traceback(exc: BaseException) -> TracebackType | None:
    """The traceback of ``exc`` from its first frame outside the worker side."""
    tb = exc.__traceback__
    while tb is not None and str(tb.tb_frame.f_globals.get("__name__")).startswith(__package__):
        tb = tb.tb_next
    return tb


# The longest message or traceback described: the fields' lengths are 32-bit.
DESCRIPTION_LIMIT = 1 << 24


def _cut(text: str) -> str:
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    return f"{text[:DESCRIPTION_LIMIT]}... ({len(text) - DESCRIPTION_LIMIT} characters cut)"


def error_payload(exc: BaseException) -> bytes:
    """An ERROR or FAILED frame's payload for ``exc``."""
    return pack_strings(*describe(exc))


def flush_stdio() -> None:
    """Flush stdout and stderr, before a fork or an exit that skips the interpreter's."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
