"""The far end of a remote template: a relay between one byte stream and a template.

An ssh session is one byte stream that carries no descriptors, while a template's
commands hand it sockets (SPAWN, FORK) and each child needs a stream of its own. The
relay, started over the transport (its stdin and stdout), forks a normal template on
this host over a socketpair, so that forks, pidfds and ``SCM_RIGHTS`` stay local, and
multiplexes the one stream: every socket it holds for the parent (a template's
channel, a child's socket) is a numbered stream of DATA frames, with credits so that
one stream that floods or is not read never stalls the others nor fills memory. It
reads the channels' frames to give each SPAWN and FORK the socket of the stream the
parent announced (EXPECT), keeps each child's pidfd (SIGNAL), and serves imports of
modules this host lacks from the parent (IMPORT, MODULE; see :mod:`._imports`). The
end of its stdin, a link silent for longer than the timeout, or a broken frame ends
everything it started. Standard library only, like all of the worker side.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import marshal
import os
import select
import socket
import struct
import sys
import time
from collections import deque

from . import _template, _wire
from ._imports import Imports, Questions
from ._wire import HEADER, close_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The frames of the mux: the id is a stream's number (1: the template's channel), or
# for IMPORT and MODULE a request's.
DATA = 40  # bytes of a stream
CREDIT = 41  # payload COUNT: the receiver took that many more bytes of the stream
EOF = 42  # the sender's end sends no more on this stream
CLOSE = 43  # the sender's end is closed: send nothing more on this stream
EXPECT = 44  # parent: the next SPAWN or FORK on channel COUNT gets this stream
SIGNAL = 45  # parent: send signal COUNT to the process of this child stream
PING = 46  # keepalive, both ways
IMPORT = 47  # relay: the module named in the payload, please; answered by MODULE
MODULE = 48  # parent: marshal of (is_package, source, filename), or of None
SETUP = 49  # parent, first of all: marshal of {"env", "cwd", "imports", "timeout"}
COUNT = struct.Struct("<q")
WINDOW = 1024 * 1024  # bytes of one stream in flight one way, at most
CHUNK = 256 * 1024  # the most bytes of one DATA frame
MAX_FRAME = CHUNK + 64 * 1024  # a larger frame is not one of ours
_QUEUE = 4 * CHUNK  # unsent frames before we stop reading streams
PIPE_SIZE = 1024 * 1024  # what an unprivileged process may ask of a pipe
_ANCILLARY = socket.CMSG_SPACE(4 * 4)
_STARTED = HEADER.size + _wire.PID.size  # a child's first frame: STARTED, with a pidfd


class Broken(Exception):
    """The parent sent what no parent of ours sends."""


class _Pipe:
    """What :meth:`Outbox.flush` needs of a socket, on the output pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: Any) -> int:
        return os.write(self.fd, data)

    def sendmsg(self, buffers: list[Any], ancdata: object = ()) -> int:
        return os.writev(self.fd, buffers)


class Stream:
    """One stream: a template's channel (frames read here) or a child's socket (bytes)."""

    def __init__(self, id: int, sock: socket.socket, channel: bool) -> None:
        self.id, self.sock, self.channel = id, sock, channel
        sock.setblocking(False)
        self.credit = WINDOW  # what we may still send the parent
        self.owed = 0  # what the parent sent that we have not credited yet
        self.taken = 0  # of that, what is in the socket already
        self.inbox = _wire.Outbox()  # from the parent, for the socket
        self.pending = bytearray()  # frames a channel sent, for the parent
        self.reader = _wire.FrameReader()
        self.head = bytearray()  # of a channel's frame from the parent, while incomplete
        self.need = 0  # bytes of that frame's payload still to come
        self.expected: deque[int] = deque()
        self.first = not channel  # a child's STARTED is still to come
        self.ended = 0  # READING, then AT_END, then EOF_SENT
        self.shut = 0  # the parent's EOF (shut our writes once flushed), then CLOSE
        self.mask = 0


READING, AT_END, EOF_SENT = 0, 1, 2


class Relay:
    def __init__(self, input: int, output: int, timeout: float, imports: socket.socket | None):
        self.input, self.output, self.pipe = input, output, _Pipe(output)
        self.out = _wire.Outbox()
        self.reader = _wire.FrameReader()
        self.streams: dict[int, Stream] = {}
        self.fds: dict[int, Stream] = {}
        self.pidfds: dict[int, int] = {}  # child stream -> its pidfd
        self.exits: dict[tuple[int, int], int] = {}  # (channel, SPAWN's id) -> stream
        self.poller = select.poll()
        self.poller.register(input, select.POLLIN)
        self.writing = False
        self.timeout = timeout
        self.heard = self.said = time.monotonic()
        self.imports = None if imports is None else Questions(imports, self.ask)
        if imports is not None:
            self.poller.register(imports, select.POLLIN)

    def send(self, op: int, id: int, payload: bytes = b"") -> None:
        self.out.put(_wire.encode(op, id, payload))

    def add(self, id: int, sock: socket.socket, channel: bool) -> Stream:
        stream = self.streams[id] = self.fds[sock.fileno()] = Stream(id, sock, channel)
        return stream

    def drop(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self.fds.pop(stream.sock.fileno(), None)
        if stream.mask:
            self.poller.unregister(stream.sock)
        stream.inbox.clear()
        stream.reader.close()
        stream.sock.close()

    def run(self) -> None:
        """Serve until the parent is gone, silent too long, or broke the protocol."""
        self.dispatch()  # what came with SETUP
        while True:
            self.flush()
            for stream in list(self.streams.values()):
                self.arm(stream)
            now = time.monotonic()
            if now - self.said >= self.timeout / 3:
                self.send(PING, 0)
                self.flush()
            wait = min(self.said + self.timeout / 3, self.heard + self.timeout) - now
            for fd, events in self.poller.poll(max(0, int(wait * 1000) + 1)):
                if fd == self.input:
                    if not self.receive():
                        return
                elif fd == self.output:
                    pass  # flushed above
                elif self.imports is not None and fd == self.imports.fileno():
                    if not self.imports.take():  # every process that could ask is gone
                        self.poller.unregister(fd)
                        self.imports.close()
                elif fd in self.fds:
                    self.serve(self.fds[fd], events)
            if time.monotonic() - self.heard > self.timeout:
                return  # the link is lost: no FIN, no RST, just silence

    def flush(self) -> None:
        for stream in self.streams.values():
            while stream.pending and stream.credit > 0 and self.out.size < _QUEUE:
                data = bytes(stream.pending[: min(stream.credit, CHUNK)])
                del stream.pending[: len(data)]
                stream.credit -= len(data)
                self.send(DATA, stream.id, data)
            if stream.ended == AT_END and not stream.pending:
                stream.ended = EOF_SENT
                self.send(EOF, stream.id)
        if self.out.size:
            self.said = time.monotonic()
        done = self.out.flush(self.pipe)  # type: ignore[arg-type]
        if done == self.writing:
            self.writing = not done
            if self.writing:
                self.poller.register(self.output, select.POLLOUT)
            else:
                self.poller.unregister(self.output)

    def arm(self, stream: Stream) -> None:
        mask = select.POLLOUT if len(stream.inbox) else 0
        if stream.ended == READING and self.out.size < _QUEUE:
            if stream.credit > 0 if not stream.channel else len(stream.pending) < WINDOW:
                mask |= select.POLLIN
        if mask != stream.mask:
            if not stream.mask:
                self.poller.register(stream.sock, mask)
            elif mask:
                self.poller.modify(stream.sock, mask)
            else:
                self.poller.unregister(stream.sock)
            stream.mask = mask
        if stream.ended == EOF_SENT and stream.shut == CLOSE:
            self.drop(stream)

    def serve(self, stream: Stream, events: int) -> None:
        if len(stream.inbox):
            self.write(stream)
        if stream.id in self.streams and stream.mask & select.POLLIN:
            self.read(stream)

    def write(self, stream: Stream) -> None:
        before = stream.inbox.size
        try:
            stream.inbox.flush(stream.sock)
        except OSError:  # its reader is gone: the parent should stop sending
            stream.inbox.clear()
            if stream.shut != CLOSE:
                stream.shut = CLOSE
                self.send(CLOSE, stream.id)
        stream.taken += before - stream.inbox.size
        # Not for every write: a credit per message would double the frames, and
        # the wake-ups of the parent.
        if stream.taken >= WINDOW // 4:
            stream.owed -= stream.taken
            self.send(CREDIT, stream.id, COUNT.pack(stream.taken))
            stream.taken = 0
        if stream.shut == EOF and not len(stream.inbox):
            stream.shut = CLOSE
            try:
                stream.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def read(self, stream: Stream) -> None:
        try:
            if stream.channel:
                if stream.reader.receive(stream.sock):
                    while (frame := stream.reader.next_frame()) is not None:
                        self.from_template(stream, frame)
                    return
                data = b""
            elif stream.first:
                data, ancdata, _, _ = stream.sock.recvmsg(
                    min(stream.credit, CHUNK), _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
                fds = _wire.parse_ancillary(ancdata)
                stream.first = False
                if len(data) == _STARTED and data[0] == _wire.STARTED and len(fds) == 1:
                    self.pidfds[stream.id] = fds.pop()
                    data = HEADER.pack(_wire.STARTED, 0, 0, _wire.PID.size) + data[HEADER.size :]
                close_all(fds)
            else:
                data = stream.sock.recv(min(stream.credit, CHUNK))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            stream.ended = AT_END
        else:
            stream.credit -= len(data)
            self.send(DATA, stream.id, data)

    def from_template(self, stream: Stream, frame: _wire.Frame) -> None:
        if frame.op == _wire.FORKED and frame.fds and (stream.id, frame.id) in self.exits:
            self.pidfds[self.exits[(stream.id, frame.id)]] = frame.fds.pop()
        close_all(frame.fds)
        if frame.op == _wire.EXITED:
            child = self.exits.pop((stream.id, frame.id), None)
            close_all([self.pidfds.pop(child, -1)] if child is not None else [])
        stream.pending += HEADER.pack(frame.op, 0, frame.id, len(frame.payload))
        stream.pending += frame.payload

    def receive(self) -> bool:
        try:
            if not self.reader.receive_fd(self.input):
                return False
        except BlockingIOError:
            return True
        self.heard = time.monotonic()
        self.dispatch()
        return True

    def dispatch(self) -> None:
        while (frame := self.reader.next_frame()) is not None:
            self.handle(frame)
        if oversized(self.reader):
            raise Broken("a frame too large")

    def handle(self, frame: _wire.Frame) -> None:
        op, id, payload = frame.op, frame.id, frame.payload
        stream = self.streams.get(id)
        if op == DATA:
            if stream is None or stream.shut:
                return  # sent before our CLOSE reached the parent
            stream.owed += len(payload)
            if stream.owed > WINDOW:
                raise Broken(f"stream {id} overran its window")
            if stream.channel:
                self.to_template(stream, payload)
            else:
                stream.inbox.put([([payload], [])])
            self.write(stream)
        elif op in (CREDIT, SIGNAL, EXPECT):
            (count,) = COUNT.unpack(payload)
            if op == CREDIT and stream is not None:
                stream.credit += count
            elif op == SIGNAL and id in self.pidfds:
                try:
                    _signal.pidfd_send_signal(self.pidfds[id], count)
                except OSError:
                    pass
            elif op == EXPECT and count in self.streams:
                self.streams[count].expected.append(id)
        elif op == EOF:
            if stream is not None and not stream.shut:
                stream.shut = EOF
                self.write(stream)
        elif op == CLOSE:
            if stream is not None:
                self.drop(stream)  # its child sees the end, or a broken pipe
        elif op == MODULE:
            if self.imports is not None:
                self.imports.answered(id, payload)
        elif op != PING:
            raise Broken(f"unknown frame {op}")

    def to_template(self, stream: Stream, data: bytes) -> None:
        """Pass a channel's bytes on, giving each SPAWN and FORK its stream's socket."""
        view = memoryview(data)
        while view:
            if stream.need:
                part, view = view[: stream.need], view[stream.need :]
                stream.need -= len(part)
                stream.inbox.put([([part], [])])  # type: ignore[list-item]
                continue
            missing = HEADER.size - len(stream.head)
            stream.head += view[:missing]
            view = view[missing:]
            if len(stream.head) < HEADER.size:
                return
            op, _, id, length = HEADER.unpack(stream.head)
            stream.head.clear()
            fds = []
            if op in (_wire.SPAWN, _wire.FORK):
                if not stream.expected:
                    raise Broken(f"a {op} command without its stream")
                new = stream.expected.popleft()
                ours, theirs = socket.socketpair()
                self.add(new, ours, op == _wire.FORK)
                self.exits[(stream.id, id)] = new
                fds = [theirs.detach()]
            stream.inbox.put([([HEADER.pack(op, len(fds), id, length)], fds)])
            stream.need = length

    def ask(self, request: int, name: bytes) -> None:
        """A process of ours wants a module the relay does not know (see _imports)."""
        self.send(IMPORT, request, name)

    def shutdown(self, pid: int, pidfd: int) -> None:
        """End everything: the template kills and reaps what it made, then exits."""
        self.pidfds.pop(1, -1)  # the template's (pidfd): it gets SIGTERM, to clean up below it
        for child in self.pidfds.values():
            try:
                _signal.pidfd_send_signal(child, _signal.SIGKILL)
            except OSError:
                pass
        close_all(list(self.pidfds.values()))
        if self.imports is not None:
            self.imports.close(replies=True)
        for stream in list(self.streams.values()):
            self.drop(stream)
        _signal.pidfd_send_signal(pidfd, _signal.SIGTERM)
        if not select.select([pidfd], [], [], 3)[0]:
            _signal.pidfd_send_signal(pidfd, _signal.SIGKILL)
        os.close(pidfd)
        os.waitpid(pid, 0)


def oversized(reader: _wire.FrameReader) -> bool:
    """Whether the frame the reader has begun announces more than any frame of ours."""
    start, end = reader._start, reader._end
    return end - start >= HEADER.size and HEADER.unpack_from(reader._buffer, start)[3] > MAX_FRAME


def grow_pipe(fd: int) -> None:
    """Make a pipe hold a whole frame: fewer wake-ups per MiB (nothing if not a pipe)."""
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def read_frame(fd: int, reader: _wire.FrameReader) -> _wire.Frame:
    """The first frame from the parent, read blocking (SETUP)."""
    while (frame := reader.next_frame()) is None:
        if oversized(reader) or not reader.receive_fd(fd):
            raise Broken("no SETUP")
    return frame


def start(channel: str, owner: int, sigint_blocked: bool) -> None:
    """Relay ``"relay:READ:WRITE"`` (stdin, stdout) to a template forked here."""
    input, output = (os.dup(int(fd)) for fd in channel.split(":")[1:])
    # Children write to stdout as to stderr; nothing may land among our frames.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    reader = _wire.FrameReader()
    setup = read_frame(input, reader)
    settings = marshal.loads(setup.payload) if setup.op == SETUP else sys.exit(1)
    if settings["cwd"] is not None:
        os.chdir(settings["cwd"])
    if settings["env"] is not None:
        os.environ.clear()
        os.environ.update(settings["env"])
    ours, theirs = socket.socketpair()
    asking, serving = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _wire.flush_stdio()
    pid = os.fork()
    if pid == 0:
        close_all([input, output, ours.detach(), serving.detach()])
        if settings["imports"]:
            sys.meta_path.append(Imports(asking))  # type: ignore[arg-type]
        else:
            asking.close()
        _template.main(_template.Link(theirs), os.getppid(), sigint_blocked)
        os._exit(0)
    theirs.close()
    asking.close()
    for fd in (input, output):
        os.set_blocking(fd, False)
        grow_pipe(fd)
    relay = Relay(input, output, settings["timeout"], serving if settings["imports"] else None)
    relay.reader = reader  # with what came after SETUP
    relay.add(1, ours, True)
    relay.pidfds[1] = template = os.pidfd_open(pid)
    try:
        relay.run()
    except (Broken, struct.error, OSError) as exc:
        print(f"trio_fork relay: {exc}", file=sys.stderr)
    relay.shutdown(pid, template)
