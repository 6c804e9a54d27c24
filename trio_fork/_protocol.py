"""The wire format spoken between the parent and its template processes.

Standard library only: this module is loaded into every template, which must never
import trio, anyio or anything else that is unsafe to fork.

A frame is a fixed header (opcode, number of file descriptors, payload length)
followed by the payload. File descriptors travel as ``SCM_RIGHTS`` ancillary data on
the bytes of the frame they belong to, at most :data:`MAX_FDS_PER_MESSAGE` per
``sendmsg``. On a Unix stream socket Linux returns at most one fd-carrying message
per ``recvmsg`` and stops reading right after it, so the descriptors of one
``recvmsg`` belong to the frame that holds the last byte it returned. That rule is
what lets :class:`FrameReader` hand every frame exactly its own descriptors, and
notice when the kernel dropped some (``MSG_CTRUNC``).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque

HEADER = struct.Struct("<BII")
"""Opcode, number of file descriptors, payload length."""

SEQ = struct.Struct("<I")
"""Replies start with the sequence number of the command they answer (counted from 0
in the order commands were sent), so a command may go unanswered."""

PID = struct.Struct("<i")

EXIT_STATUS = struct.Struct("<Ii")
"""EXITED: the sequence number of the command that made the process, and its exit
status (``-N`` for death by signal ``N``)."""

MAX_FDS_PER_MESSAGE = 253
"""The kernel's ``SCM_MAX_FD``: descriptors accepted in one ``sendmsg``."""

_FD = struct.Struct("i")
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD.size)
RECEIVE_SIZE = 65536

# Commands, parent to template.
REQUIRE = 1
EVAL = 2
ARGS = 3
FDS = 4
FORK = 5  # a new template; answered by FORKED
SPAWN = 6  # a child running a target; answered only if it fails (ERROR), see STARTED
KILL = 7  # SIGKILL what the command with this sequence number made; never answered
SERVE_FORKS = 8  # fork a new template per request on the SOCK_SEQPACKET socket it carries
HELLO = 9  # answered by READY: pid, Python version and a pidfd; for adopting a channel

# Template to parent: replies (SEQ first) and reports.
READY = 16  # unasked, once, when a template started or forked on request is up
OK = 17
ERROR = 18
FORKED = 19  # with the new template's pid and a pidfd
EXITED = 21  # unasked: a process this template made has been reaped

# Child to parent, on the child's own socket, before its target runs: STARTED with
# its pid and a pidfd of itself, or ERROR (with sequence number 0).
STARTED = 20

Segment = tuple[memoryview, list[int]]


class Frame:
    """One frame: opcode, payload and the descriptors that came with it."""

    __slots__ = ("fds", "fds_lost", "op", "payload")

    def __init__(self, op: int, payload: bytes, fds: list[int], fds_lost: bool) -> None:
        self.op = op
        self.payload = payload
        self.fds = fds
        self.fds_lost = fds_lost
        """The kernel dropped some of this frame's descriptors (``MSG_CTRUNC``)."""


def _padding(nfds: int, length: int) -> int:
    # Every batch of descriptors needs a byte of its own frame to ride on.
    batches = -(-nfds // MAX_FDS_PER_MESSAGE)
    return max(0, batches - HEADER.size - length)


def encode(op: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> list[Segment]:
    """Split one frame into the ``sendmsg`` calls that carry it.

    The common case (at most 253 descriptors) is a single segment.
    """
    frame = memoryview(
        HEADER.pack(op, len(fds), len(payload)) + payload + bytes(_padding(len(fds), len(payload)))
    )
    if len(fds) <= MAX_FDS_PER_MESSAGE:
        return [(frame, list(fds))]
    batches = [
        list(fds[i : i + MAX_FDS_PER_MESSAGE]) for i in range(0, len(fds), MAX_FDS_PER_MESSAGE)
    ]
    segments: list[Segment] = [(frame[i : i + 1], batch) for i, batch in enumerate(batches[:-1])]
    segments.append((frame[len(batches) - 1 :], batches[-1]))
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


class FrameReader:
    """Reassembles frames and their descriptors from what ``recvmsg`` returns.

    Sans-I/O: the caller receives, this class only parses. Descriptors that arrive
    are owned by the reader until a complete frame hands them out; :meth:`close`
    closes the ones still held.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # stream offset of _buffer[0]
        # (stream offset of the last byte received with them, descriptors, truncated)
        self._marks: deque[tuple[int, list[int], bool]] = deque()

    def feed(self, data: bytes | memoryview, fds: list[int], truncated: bool = False) -> None:
        self._buffer += data
        if fds or truncated:
            self._marks.append((self._start + len(self._buffer) - 1, fds, truncated))

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more data arrives."""
        if len(self._buffer) < HEADER.size:
            return None
        op, nfds, length = HEADER.unpack_from(self._buffer)
        size = HEADER.size + length + _padding(nfds, length)
        if len(self._buffer) < size:
            return None
        payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
        del self._buffer[:size]
        end = self._start + size
        self._start = end
        fds: list[int] = []
        lost = False
        while self._marks and self._marks[0][0] < end:
            _, received, truncated = self._marks.popleft()
            fds.extend(received)
            lost = lost or truncated
        if lost or len(fds) != nfds:
            close_all(fds)
            return Frame(op, payload, [], True)
        return Frame(op, payload, fds, False)

    @property
    def holds_fds(self) -> bool:
        """Whether descriptors were received for frames not yet returned."""
        return bool(self._marks)

    def close(self) -> None:
        """Close every descriptor received but not handed out."""
        while self._marks:
            close_all(self._marks.popleft()[1])


def receive(sock: socket.socket, reader: FrameReader, buffer: memoryview) -> bool:
    """Receive once from ``sock`` into ``reader``; False at end of file.

    Descriptors arrive close-on-exec. Raises :exc:`BlockingIOError` on a
    non-blocking socket with nothing to read.
    """
    nbytes, ancdata, flags, _ = sock.recvmsg_into([buffer], ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds = parse_ancillary(ancdata)
    if nbytes == 0:
        close_all(fds)
        return False
    reader.feed(buffer[:nbytes], fds, bool(flags & socket.MSG_CTRUNC))
    return True


def send_blocking(sock: socket.socket, segments: list[Segment]) -> None:
    """Send whole segments on a blocking socket."""
    for data, fds in segments:
        while data:
            sent = sock.sendmsg([data], ancillary(fds))
            data = data[sent:]
            fds = []


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    """The type name, message and formatted traceback of ``exc``."""
    import traceback  # only when something failed: templates stay small

    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return name, str(exc), "".join(traceback.format_exception(exc))
