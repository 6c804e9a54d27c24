"""The parent's end of a remote template's one connection: streams over a byte stream.

The transport (``ssh``) gives one byte stream each way. The relay at the far end
(:mod:`trio_fork.worker._relay`) and this mux cut it into numbered streams, each
bridged here to a local socket (:mod:`._mux_stream`): the parent's code (a
template's :class:`~trio_fork._channel.Channel`, a child's stream) holds the other
end of a socketpair and uses it as it would a local template's, unaware of the
transport; an RPC worker's :class:`~trio_fork._connection.Connection` takes its
stream over and reads and writes the frames here directly. Each stream has a window
each way (credits), so one child that floods, or one stream nobody reads, never
stalls the others, and never holds more than a window in memory. Keepalive
frames both ways notice a link that went silent, which TCP may take minutes to. The
mux also answers the relay's questions for modules (:mod:`._forwarding`).
"""

from __future__ import annotations

import marshal
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import attrs
import sniffio

from ._errors import BrokenTemplateError
from ._mux_stream import Stream, bridge
from ._transport import Transport
from .worker import _relay, _wire
from .worker._relay import CHUNK, COUNT

# Bytes queued for the transport before the streams stop reading their sockets.
_QUEUE = 4 * CHUNK
# Frames dispatched in a row before the reader lets other tasks run.
_FAIRNESS = 16
# Frames up to this size are sent as one buffer, made at once.
_JOINED = 64 * 1024
# The tail of the transport's stderr kept to explain a failure.
_STDERR_KEPT = 16 * 1024


@attrs.define(eq=False)
class Mux:
    """Streams over one transport process; see the module's docstring.

    ``answer`` gives the payload of a MODULE frame for a module name (import
    forwarding), or is None to answer every question with "not here".
    """

    name: str
    process: subprocess.Popen[bytes]
    transport: Transport
    timeout: float
    answer: Callable[[str], bytes] | None = None
    stderr: bytearray = attrs.field(factory=bytearray)
    broken: BrokenTemplateError | None = None
    drained: anyio.Event = attrs.field(factory=anyio.Event)
    """Set (and replaced) each time the queue for the transport has been sent."""
    _stderr_fd: int = -1
    _output: int = attrs.field(init=False)
    _streams: dict[int, Stream] = attrs.field(factory=dict)
    _next_id: int = 1
    _task_group: anyio.abc.TaskGroup | None = None
    _writer_busy: bool = False
    _wake_writer: anyio.Event = attrs.field(factory=anyio.Event)
    _heard: float = attrs.field(factory=time.monotonic)
    _said: float = attrs.field(factory=time.monotonic)
    _forwarding_stderr: bool = False
    _closing: bool = False
    _scope: anyio.CancelScope | None = None
    _ran: bool = False

    def __attrs_post_init__(self) -> None:
        assert self.transport.pipes is not None
        self._output = self.transport.pipes[1]

    @classmethod
    def launch(
        cls, command: list[str], name: str, timeout: float, answer: Callable[[str], bytes] | None
    ) -> Mux:
        """Start the transport command; a mux not yet running (see :meth:`run`)."""
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C here is for us, not for ssh
            )
        except OSError as exc:
            raise BrokenTemplateError(
                f"cannot start the transport {command[0]!r} to {name}: {exc.strerror}"
            ) from None
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        ends = (os.dup(process.stdout.fileno()), os.dup(process.stdin.fileno()))
        stderr = os.dup(process.stderr.fileno())
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        os.set_blocking(stderr, False)
        for fd in ends:
            _relay.grow_pipe(fd)
        return cls(name, process, Transport(pipes=ends), timeout, answer, stderr_fd=stderr)

    # Start-up, before the frames ----------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        """Queue bytes that are not frames: the start-up script and sources."""
        self.transport.put([([data], [])])
        self._flush()

    async def read_line(self, marker: bytes) -> bytes:
        """The rest of the first line of stdout that starts with ``marker``.

        What comes before it (a login script's chatter) is skipped. Reads byte by
        byte: nothing after the line may be taken from the stream.
        """
        seen = bytearray()
        fd = self.transport.fileno()
        while True:
            try:
                byte = os.read(fd, 1)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not byte:
                raise await self.failure("the remote side ended before Python started")
            seen += byte
            if byte == b"\n":
                if seen.startswith(marker):
                    return bytes(seen[len(marker) : -1])
                seen.clear()
            elif len(seen) > 64 * 1024:
                raise await self.failure("the remote side sent a line that never ends")

    async def wait_exit(self, seconds: float) -> None:
        """Wait, ``seconds`` at most, until the transport process has exited."""
        if self.process.poll() is not None:
            return
        pidfd = os.pidfd_open(self.process.pid)
        try:
            with anyio.move_on_after(seconds):
                await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.process.poll()

    async def failure(self, what: str) -> BrokenTemplateError:
        """Why the connection failed, with the transport's stderr and exit status."""
        await self.wait_exit(2)  # its last words come as it exits
        try:
            self._drain_stderr()
        except OSError:
            pass
        status = self.process.poll()
        said = self.stderr.decode(errors="replace").strip()
        return BrokenTemplateError(
            f"{self.name}: {what}"
            + (f" (the transport exited with status {status})" if status is not None else "")
            + (f"; its stderr:\n{said}" if said else "")
        )

    def _drain_stderr(self) -> bytes | None:
        """What the transport's stderr has now (kept, in part); None at its end.

        Raises:
            BlockingIOError: Nothing has come.
        """
        data = b""
        while True:
            try:
                chunk = os.read(self._stderr_fd, 65536)
            except BlockingIOError:
                if data:
                    return data
                raise
            if not chunk:
                return data or None
            data += chunk
            del self.stderr[: max(0, len(self.stderr) + len(chunk) - _STDERR_KEPT)]
            self.stderr += chunk[-_STDERR_KEPT:]

    # Streams -----------------------------------------------------------------------

    def open_stream(self) -> tuple[int, socket.socket]:
        """A new stream: its number, and the local socket that is its other end."""
        self.check()
        assert self._task_group is not None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        id = self._next_id
        self._next_id += 1
        stream = self._streams[id] = Stream(id, self, ours)
        bridge(stream, theirs)
        self._task_group.start_soon(stream.serve)
        return id, theirs

    def forget(self, stream: Stream) -> None:
        """``stream`` has ended: frames for it are dropped from now on."""
        self._streams.pop(stream.id, None)

    @property
    def queue_full(self) -> bool:
        """Whether streams should wait (for :attr:`drained`) before sending more."""
        return self.transport.outbox.size >= _QUEUE

    def expect(self, channel: int, stream: int) -> None:
        """The next SPAWN or FORK on ``channel`` gets ``stream`` (sent before it)."""
        self.send(_relay.EXPECT, stream, COUNT.pack(channel))

    def signal(self, stream: int, sig: int) -> None:
        """Send ``sig`` to the child of ``stream`` (the relay holds its pidfd)."""
        self.send(_relay.SIGNAL, stream, COUNT.pack(sig))

    def check(self) -> None:
        if self.broken is not None:
            raise BrokenTemplateError(str(self.broken)) from self.broken.__cause__

    def send(self, op: int, id: int, payload: bytes = b"") -> None:
        if self.broken is not None:
            return
        transport = self.transport
        if self._writer_busy or transport.outbox or len(payload) > _JOINED:
            transport.put(_wire.encode(op, id, payload))
            self._flush()
            return
        # Nothing queued: straight to the transport, as most calls and replies go.
        data = _wire.HEADER.pack(op, 0, id, len(payload)) + payload
        self._said = time.monotonic()
        try:
            sent = os.write(self._output, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._break(f"the transport to {self.name} broke", exc)
            return
        if sent < len(data):
            transport.put([([data[sent:]], [])])
            self._writer_busy = True
            self._wake_writer.set()

    def _flush(self) -> None:
        if self._writer_busy or self.broken is not None:
            return
        self._said = time.monotonic()
        try:
            if self.transport.flush():
                return
        except OSError as exc:
            self._break(f"the transport to {self.name} broke", exc)
            return
        self._writer_busy = True
        self._wake_writer.set()

    # The connection ------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Read, write and keep the link alive, until closed or broken.

        Not cancellable, like a template's channel: the blocks nested in it need it
        while they clean up. :meth:`close` ends it.
        """
        self._ran = True
        try:
            with anyio.CancelScope(shield=True) as self._scope:
                async with anyio.create_task_group() as task_group:
                    self._task_group = task_group
                    task_group.start_soon(self._write)
                    task_group.start_soon(self._keepalive)
                    task_group.start_soon(self._read_stderr)
                    task_status.started()
                    await self._read()
                    await anyio.sleep_forever()  # until closed: streams may still run
        finally:
            # Only now that no task waits on them (see Channel.close).
            self.transport.close()
            try:
                data = self._drain_stderr()
            except OSError:
                data = b""
            if self._forwarding_stderr and data:
                os.write(2, data)
            os.close(self._stderr_fd)

    def discard(self) -> None:
        """Close what :meth:`run` would have closed, if it never ran."""
        if not self._ran:
            self._ran = True
            self.transport.close()
            os.close(self._stderr_fd)

    async def _read(self) -> None:
        if sniffio.current_async_library() == "asyncio":
            await self._read_by_callback()
            return
        streak = 0
        drained = False
        while True:
            try:
                if drained:
                    raise BlockingIOError
                count = self._receive()
            except BlockingIOError:
                streak = 0
                try:
                    await self.transport.wait_readable()
                except anyio.ClosedResourceError:
                    return
                drained = False
                continue
            if count is None:
                return
            # A read shorter than the room it had emptied the pipe: asking again
            # would only fail (a system call, and an exception, per message).
            drained = count < _wire.RECEIVE_SIZE
            streak += 1
            if streak == _FAIRNESS:
                streak = 0
                await anyio.lowlevel.checkpoint()

    async def _read_by_callback(self) -> None:
        """asyncio's way: a reader callback that stays registered.

        Waiting for the pipe with a task would register it and unregister it again
        for every message: two system calls, and a wake-up of the task.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        fd = self.transport.fileno()
        ended = anyio.Event()

        def on_readable() -> None:
            try:
                if self._receive() is not None:
                    return
            except BlockingIOError:
                return
            except Exception as exc:  # a bug of ours: the connection cannot go on
                self._break(f"the connection to {self.name} failed: {exc!r}", exc)
            loop.remove_reader(fd)
            ended.set()

        loop.add_reader(fd, on_readable)
        try:
            await ended.wait()
        finally:
            loop.remove_reader(fd)

    def _receive(self) -> int | None:
        """Receive once and dispatch what came: how many bytes; None at the end.

        Raises:
            BlockingIOError: Nothing has come.
        """
        transport = self.transport
        try:
            count = transport.receive()
            if not count:
                if transport.reader.in_frame:
                    self._break(f"{self.name} sent a frame cut short")
                elif not self._closing:
                    self._break(f"the connection to {self.name} ended")
                return None
            self._heard = time.monotonic()
            while (frame := transport.next_frame()) is not None:
                self._dispatch(frame)
            if _relay.oversized(transport.reader):
                raise ValueError("a frame too large")
            return count
        except BlockingIOError:
            raise
        except (ValueError, struct.error) as exc:
            self._break(f"{self.name} broke the protocol: {exc}", exc)
        except OSError as exc:
            self._break(f"the transport to {self.name} broke", exc)
        return None

    def _dispatch(self, frame: _wire.Frame) -> None:
        op, id, payload = frame.op, frame.id, frame.payload
        stream = self._streams.get(id)
        if op == _relay.DATA:
            if stream is not None:
                stream.on_data(payload)
        elif op == _relay.CREDIT:
            (count,) = COUNT.unpack(payload)
            if stream is not None:
                stream.on_credit(count)
        elif op in (_relay.EOF, _relay.CLOSE):
            if stream is not None:
                stream.on_end(op == _relay.CLOSE)
        elif op == _relay.IMPORT:
            name = payload.decode(errors="replace")
            self.send(_relay.MODULE, id, self.answer(name) if self.answer else marshal.dumps(None))
        elif op != _relay.PING:
            raise ValueError(f"unknown frame {op}")

    async def _write(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = anyio.Event()
            while self.broken is None:
                try:
                    await self.transport.wait_writable()
                except anyio.ClosedResourceError:
                    return
                try:
                    if self.transport.flush():
                        break
                except OSError as exc:
                    self._break(f"the transport to {self.name} broke", exc)
                    return
            self._writer_busy = False
            self.drained.set()
            self.drained = anyio.Event()

    async def _keepalive(self) -> None:
        interval = self.timeout / 3
        while True:
            await anyio.sleep(interval / 2)
            now = time.monotonic()
            if now - self._heard > self.timeout:
                self._break(
                    f"the link to {self.name} was lost: nothing came for {self.timeout:g} s"
                )
                return
            if now - self._said >= interval:
                self.send(_relay.PING, 0)

    async def _read_stderr(self) -> None:
        """Keep the tail of the transport's stderr; once started, pass it on to ours."""
        while True:
            try:
                data = self._drain_stderr()
            except BlockingIOError:
                await anyio.wait_readable(self._stderr_fd)
                continue
            except OSError:
                return
            if data is None:
                return
            if self._forwarding_stderr:
                await anyio.to_thread.run_sync(os.write, 2, data)

    def started(self) -> None:
        """The remote template is up: its stderr (children's output) is passed on."""
        self._forwarding_stderr = True
        self.stderr.clear()

    def _break(self, message: str, cause: BaseException | None = None) -> None:
        if self.broken is not None:
            return
        self.broken = BrokenTemplateError(message)
        self.broken.__cause__ = cause
        # Every stream ends: their users see end of file, or a broken pipe; and the
        # transport ends, so that the relay sees the end too.
        for stream in list(self._streams.values()):
            stream.scope.cancel()
        if self.process.poll() is None:
            self.process.kill()
        self.drained.set()

    async def aclose(self, grace: float) -> None:
        """End the connection: end of file to the relay, which ends everything there.

        Waits, shielded, up to ``grace`` seconds for the transport to exit (it exits
        once the relay has), then kills it.
        """
        with anyio.CancelScope(shield=True):
            self._closing = True
            with anyio.move_on_after(grace / 2):
                while self.transport.outbox.size and self.broken is None:
                    await self.drained.wait()
            for stream in list(self._streams.values()):
                stream.scope.cancel()
            if self.broken is None:
                self.broken = BrokenTemplateError(f"the connection to {self.name} is closed")
                # End of file for the relay, while we still read what it says.
                assert self.transport.pipes is not None
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self.transport.pipes[1])
                os.close(null)
            await self.wait_exit(grace)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self._scope is not None:
                self._scope.cancel()
