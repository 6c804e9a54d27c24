"""The server that ``trio_fork run`` hands programs to (a zygote): its connections.

The server keeps a template that has imported the preload list
(:mod:`._zygote_generation`), and listens on a Unix socket in a directory only its
user can enter. It does not take the connections itself, as a rule: it *arms*
spare children of its template, hands them the listening socket, and the first to
take a connection checks the client's uid and the template's freshness, reads the
request and becomes the program (:mod:`trio_fork.worker._program`); a run costs no
wake-up of the server. The spare tells the server which connection it took; the
server then passes on the client's signals (:mod:`._zygote_run`), sends the
program's exit status once the template has reaped it, and kills the program (and
its process group) if the client goes away first, even killed by SIGKILL: a program
never outlives its client.
What a spare does not run (``status`` and ``stop``, a run that its template is too
old for) it leaves to the server, which also takes connections itself whenever no
spare is armed.

Before a run, the server (or the armed spare) checks that the template is fresh
(:mod:`._zygote_fresh`); when a preloaded module's file, the interpreter or the
installed packages changed, a new template serves the run, and the old one ends once
its runs are over.

It refuses a peer of another uid (``SO_PEERCRED``), although the directory already
keeps others out; it never listens on an abstract socket (those have no permissions
at all: CVE-2022-42919 in multiprocessing's forkserver), nor on TCP. The ``serve``
command that runs it is :mod:`._zygote_serve`.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import anyio
import attrs
from anyio.abc import TaskGroup

from ._errors import BrokenTemplateError, RemoteError
from ._transport import _receive_into
from ._zygote_client import HEADER_SIZE, MAGIC, peer_credentials
from ._zygote_generation import Generation, Spare, keep_generation
from ._zygote_run import until_exit
from .worker import _wire

# Arguments and environment: the kernel passes a few MiB of them to a program at most.
_MAX_REQUEST = 64 << 20
ARMED = 2
"""Spares waiting on the socket at a time: the second takes a run while the first is
replaced."""


class RunError(Exception):
    """A request cannot be served; the client is told why."""


@attrs.define(eq=False)
class Server:
    """A running server: its socket, its generations, its armed spares and connections."""

    preload: list[str]
    path: str
    task_group: TaskGroup
    listener: socket.socket
    identity: int  # the inode of the socket's name, to remove it only if it is ours
    current: Generation | None = None
    generations: int = 0
    served: int = 0
    running: int = 0
    started: float = attrs.field(factory=time.time)
    last_active: float = attrs.field(factory=time.monotonic)
    restarting: anyio.Lock = attrs.field(factory=anyio.Lock)
    new_generation: anyio.Event = attrs.field(factory=anyio.Event)
    stopping: anyio.Event = attrs.field(factory=anyio.Event)
    listening: bool = True
    # Connections of `serve --stop` clients, closed once everything has ended.
    stop_waiters: list[int] = attrs.field(factory=list)
    handlers: int = 0  # connections being served
    quiet: anyio.Event = attrs.field(factory=anyio.Event)  # set when none are
    armed: int = 0
    arm_wanted: anyio.Event = attrs.field(factory=anyio.Event)
    unarmed: anyio.Event = attrs.field(factory=anyio.Event)
    accept_wait: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)

    # Generations --------------------------------------------------------------

    async def start_generation(self) -> Generation:
        self.generations += 1
        generation: Generation = await self.task_group.start(
            keep_generation, self.generations, self.preload
        )
        return generation

    async def fresh_generation(self) -> Generation:
        """The generation to fork the next run from: a new one if the current is stale."""
        generation = self.current
        if generation is not None and generation.stale() is None:
            return generation
        async with self.restarting:
            generation = self.current
            reason = "the last start failed" if generation is None else generation.stale()
            if generation is not None and reason is None:
                return generation  # another run started it meanwhile
            log(f"starting a new template: {reason}")
            old, self.current = self.current, None
            if old is not None:
                old.retire()  # it ends once its runs are over
            try:
                new = await self.start_generation()
            except RemoteError as exc:
                message = f"a preloaded module failed to import:\n{exc.remote_traceback}"
                raise RunError(message) from None
            except (BrokenTemplateError, OSError) as exc:
                # Most likely the interpreter changed under us: a new server will do.
                self.stopping.set()
                raise RunError(f"cannot start a template ({exc}); the server stops") from None
            self.current = new
            self.new_generation.set()
            self.new_generation = anyio.Event()
            # Spares of the old template still wait on the socket: a connection each
            # sends them away (they find it is not a run).
            for _ in range(self.armed):
                _poke(self.path)
            return new

    # Armed spares -------------------------------------------------------------

    async def keep_armed(self) -> None:
        """Keep :data:`ARMED` spares waiting on the socket itself."""
        while True:
            if self.armed >= ARMED or not self.listening:
                self.arm_wanted = anyio.Event()
                await self.arm_wanted.wait()
                continue
            generation = self.current
            if generation is None or generation.broken:
                try:
                    generation = await self.fresh_generation()
                except RunError:
                    await self.new_generation.wait()  # a run will try again, and say why
                    continue
            # No freshness check here: the armed spare checks at the moment it takes a
            # connection, and leaves a run its template is too old for to the server.
            generation.runs += 1
            try:
                spare = await generation.take()
            except BrokenTemplateError:
                generation.broken = True
                generation.leave()
                continue
            fingerprint = generation.fingerprint.encode()
            frame = _wire.HEADER.pack(_wire.FDS, 1, 0, len(fingerprint)) + fingerprint
            try:
                await spare.child.stream.send_fds(frame, [self.listener.fileno()])
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                spare.released.set()
                generation.leave()
                continue
            self._count_armed(+1)
            self.task_group.start_soon(self.serve_armed, generation, spare)

    def _count_armed(self, change: int) -> None:
        self.armed += change
        if not self.armed:
            self.unarmed.set()
        elif self.unarmed.is_set():
            self.unarmed = anyio.Event()
            self.accept_wait.cancel()  # the spares take the connections now
        if change < 0:
            self.arm_wanted.set()

    async def serve_armed(self, generation: Generation, spare: Spare) -> None:
        """Serve the connection that an armed spare takes, with it or without it."""
        conn = None
        try:
            try:
                message, fds = await spare.child.stream.receive_fds(1, 1)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                message, fds = b"", []  # it died, or the socket was shut
            finally:
                self._count_armed(-1)
            if message != b"T" or len(fds) != 1:
                _wire.close_all(fds)
                return
            conn = socket.socket(fileno=fds[0])
            self.handlers += 1
            pid, uid, _ = peer_credentials(conn)
            if uid != os.getuid():
                log(f"refused a connection from pid {pid}, uid {uid}")  # so did the spare
                return
            try:
                answer = await spare.child.stream.receive(1)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                answer = b""  # it closed its socket: it runs the program
            # Only now that the spare has read what it reads from the connection: the
            # two share the descriptor's flags, and the spare's reads block.
            conn.setblocking(False)
            if answer == b"N":
                handled, conn = conn, None
                await self.handle(handled)
                return
            await self.watch_run(conn, spare)
        finally:
            if conn is not None:
                conn.close()
                self._handler_done()
            spare.released.set()
            generation.leave()

    # Connections the server takes -------------------------------------------

    async def accept(self) -> None:
        """Take connections while no spare is armed (none could be forked, say)."""
        while self.listening:
            await self.unarmed.wait()
            with anyio.CancelScope() as self.accept_wait:
                await anyio.wait_readable(self.listener)
                try:
                    conn, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:  # out of descriptors, say: let runs end first
                    log(f"cannot accept a connection: {exc}")
                    await anyio.sleep(0.1)
                    continue
                self.start_handler(conn)

    def start_handler(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.handlers += 1
        self.task_group.start_soon(self.handle, conn)

    def _handler_done(self) -> None:
        self.handlers -= 1
        if not self.handlers:
            self.quiet.set()

    async def handle(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                pid, uid, _ = peer_credentials(conn)
                if uid != os.getuid():
                    log(f"refused a connection from pid {pid}, uid {uid}")
                    return
                try:
                    payload, fds = await _read_request(conn)
                except (OSError, RunError) as exc:
                    log(f"dropped a bad request from pid {pid}: {exc}")
                    return
                command = payload.split(b"\0", 1)[0]
                try:
                    if command == b"run":
                        await self.run(conn, payload, fds)
                    elif command == b"status":
                        await _send(conn, _text(b"T", self.status()))
                    elif command == b"stop":
                        log(f"stopping, as pid {pid} asked")
                        self.stop_waiters.append(os.dup(conn.fileno()))
                        await _send(conn, _text(b"T", f"stopping server {os.getpid()}\n"))
                        self.stopping.set()
                    elif command != b"noop":  # a poke, for spares to move aside
                        raise RunError(f"unknown request {command[:20]!r}")
                except RunError as exc:
                    await _send(conn, _text(b"E", str(exc)))
        except OSError:
            pass  # the client went away while we answered
        finally:
            _wire.close_all(fds)
            self._handler_done()

    async def run(self, conn: socket.socket, payload: bytes, fds: list[int]) -> None:
        """A run that came to the server: hand it to a spare of a fresh template."""
        if not 1 <= len(fds) <= 4:
            raise RunError(f"a run comes with 1 to 4 descriptors, not {len(fds)}")
        for _ in range(2):  # a second try, if the first spare died waiting
            generation = await self.fresh_generation()
            generation.runs += 1
            try:
                try:
                    spare = await generation.take()
                except BrokenTemplateError:
                    generation.broken = True
                    continue
                try:
                    frame = _wire.HEADER.pack(_wire.ARGS, len(fds) + 1, 0, len(payload))
                    await spare.child.stream.send_fds(frame + payload, [conn.fileno(), *fds])
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    spare.released.set()
                    continue
                _wire.close_all(fds)
                fds.clear()
                try:
                    await self.watch_run(conn, spare)
                finally:
                    spare.released.set()
                return
            finally:
                generation.leave()
        raise RunError("cannot fork the program: the template's children die at once")

    # A run ------------------------------------------------------------------

    async def watch_run(self, conn: socket.socket, spare: Spare) -> None:
        """While a spare runs a program: pass on signals, then send the exit status."""
        self.running += 1
        self.last_active = time.monotonic()
        try:
            status = await until_exit(conn, spare)
        except BrokenTemplateError as exc:
            raise RunError(f"the program was lost: {exc}") from None
        except anyio.get_cancelled_exc_class():
            try:  # no waiting now: the client hears it, or the end of the connection
                conn.send(_text(b"E", "the server stopped before the program ended"))
            except OSError:
                pass
            spare.child.kill()
            raise
        finally:
            self.running -= 1
            self.last_active = time.monotonic()
        self.served += 1
        try:
            await _send(conn, b"X" + status.to_bytes(4, "little", signed=True))
        except OSError:
            pass  # the client heard it from the program, and left

    def status(self) -> str:
        uptime = int(time.time() - self.started)
        generation = self.current
        template = (
            "no template (its last start failed)"
            if generation is None
            else f"template pid {generation.template.pid} (generation {generation.number})"
        )
        return (
            f"trio_fork server pid {os.getpid()}, up {uptime // 3600}h{uptime // 60 % 60:02}m"
            f"{uptime % 60:02}s, socket {self.path}\n"
            f"  python {sys.executable}, preload: {', '.join(self.preload) or '(nothing)'}\n"
            f"  {template}; {self.running} run(s) in progress, {self.served} served\n"
        )

    # Stopping ---------------------------------------------------------------

    def stop_listening(self, *, serve_queued: bool) -> None:
        """Take the socket's name away, then serve or turn away who connected already.

        Once the name is gone, a client starts a new server instead of connecting to
        this one: so no run is lost between the decision to stop and the stop.
        """
        if not self.listening:
            return
        self.listening = False
        self.accept_wait.cancel()
        self.arm_wanted.set()
        try:
            if os.stat(self.path).st_ino == self.identity:  # not a new server's
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # BlockingIOError: nobody else
                break
            if serve_queued:
                self.start_handler(conn)
                continue
            with conn:
                try:
                    conn.send(_text(b"E", "the server is stopping: run the command again"))
                except OSError:
                    pass
        # Armed spares see the socket shut, and exit.
        self.listener.shutdown(socket.SHUT_RDWR)

    async def stop_when_idle(self, seconds: float) -> None:
        while True:
            left = self.last_active + seconds - time.monotonic()
            if left <= 0 and not self.running:
                break
            await anyio.sleep(max(left, 1.0))
        log(f"stopping: no run for {seconds:g} s")
        self.stop_listening(serve_queued=True)
        self.quiet = anyio.Event()
        if not self.handlers:
            self.quiet.set()
        await self.quiet.wait()
        self.stopping.set()


def _poke(path: str) -> None:
    """Connect, and send a request that is not a run (see ``Server.fresh_generation``)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.setblocking(False)
        try:
            sock.connect(path)
            sock.send(MAGIC + (4).to_bytes(8, "little") + b"noop")
        except OSError:
            pass


async def _read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    data = bytearray()
    fds: list[int] = []
    try:
        if not await _receive_into(conn, data, HEADER_SIZE, fds):
            raise RunError("the connection ended before a request")
        if data[: len(MAGIC)] != MAGIC:
            raise RunError("not a trio_fork run request (another version of trio_fork?)")
        length = int.from_bytes(data[len(MAGIC) : HEADER_SIZE], "little")
        if length > _MAX_REQUEST:
            raise RunError(f"a request of {length} bytes is too long")
        if not await _receive_into(conn, data, HEADER_SIZE + length, fds):
            raise RunError("the connection ended in the middle of a request")
    except BaseException:
        _wire.close_all(fds)
        raise
    return bytes(data[HEADER_SIZE:]), fds


def _text(kind: bytes, text: str) -> bytes:
    data = text.encode("utf-8", "replace")
    return kind + len(data).to_bytes(4, "little") + data


async def _send(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(conn)


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stderr.write(f"trio_fork serve [{os.getpid()}] {stamp}: {message}\n")
    sys.stderr.flush()
