"""The spawn block, once for every kind of template: start a child, hand it out, end it.

A local template and a remote one differ in how a SPAWN command reaches the template
(a socketpair and descriptors here; a stream of the ssh connection there) and in what
the child's confirmation brings (its pidfd here; only its pid there, the relay
keeping the pidfd). Everything else is what the reliability guarantees are about, and
must not differ: a spawn cancelled at any point leaves no process, and kills the
child *before* closing its socket, so that its target never sees end of file because
of a cancellation; a block left by an exception or a cancellation kills the child,
then waits for it, shielded and bounded; a child that ends before it confirms is an
error that says how it ended; a template belongs to the event loop that opened it.
So that is written once, here, in :class:`Spawner`, over a seam of methods that each
kind of template provides: :meth:`Spawner._send_spawn` (send the command, and say
how the confirmation makes a process), :meth:`Spawner._check` (is the template still
usable, and if not, why) and :meth:`Spawner._stream_of` (the child's stream, bytes
only where descriptors cannot go).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import attrs
import sniffio
from anyio.abc import UNIXSocketStream

from ._arguments import FileDescriptorLike, target_name
from ._channel import remote_error
from ._child import Child, Process
from ._errors import BrokenTemplateError
from ._process import CLOSE_TIMEOUT
from ._transport import FirstFrame
from .worker import _wire

if TYPE_CHECKING:
    from ._channel import Channel, ExitSlot


@attrs.define(eq=False)
class Spawning:
    """A SPAWN command sent: what the spawn waits on, and how to read the answer.

    ``process_of`` makes the :class:`Process` from the child's first frame, if that
    frame is a STARTED that confirms a start; None otherwise.
    """

    id: int
    slot: ExitSlot
    sock: socket.socket
    process_of: Callable[[_wire.Frame], Process | None]


class Spawner:
    """What every template's ``spawn`` shares; see the module's docstring.

    Subclasses are attrs classes with the fields below; they implement
    :meth:`_send_spawn` and :meth:`_check`, and may replace :meth:`_stream_of` (or,
    for workers whose socket is not a plain socket, :meth:`_spawn_worker`).
    """

    _channel: Channel
    # spawn() and fork() blocks open, or starting, on this template (see export()).
    _blocks: int
    # The event loop that opened the template, and its thread: the only ones it may
    # be used from.
    _loop: object
    _thread: str
    # Whether functions defined in this program's __main__ can be found there by name.
    shares_main: bool
    # Who lacks this program's __main__ when shares_main is false, for the message.
    _main_owner = "the template"

    def _send_spawn(
        self, name: str, args: tuple[object, ...], fds: Iterable[FileDescriptorLike]
    ) -> Spawning:
        """Check the arguments and send SPAWN for target ``name``; no await."""
        raise NotImplementedError

    def _check(self) -> None:
        """Raise if the template can no longer take commands, saying why."""
        raise NotImplementedError

    async def _stream_of(self, sock: socket.socket) -> UNIXSocketStream:
        """The child's :attr:`~Child.stream` over our end of its socket."""
        return await UNIXSocketStream.from_socket(sock)

    def _check_loop(self) -> None:
        """Refuse a call from another event loop: its waits would wake up the wrong one."""
        if current_event_loop() is not self._loop:
            raise RuntimeError(
                f"{self!r} belongs to the event loop that opened it, in thread "
                f"{self._thread!r}: it cannot be used from another event loop or thread "
                "(from a worker thread of that event loop, call it through "
                "anyio.from_thread.run)"
            )

    @asynccontextmanager
    async def _spawn(
        self,
        target: str | Callable[..., object],
        args: tuple[object, ...],
        fds: Iterable[FileDescriptorLike],
        deliver_cancel: Callable[[Child], Awaitable[object]] | None,
    ) -> AsyncIterator[Child]:
        """The body of ``spawn`` (see :meth:`Template.spawn` for the contract)."""
        process, sock = await self._start_process(target, args, fds)
        self._blocks += 1
        try:
            try:
                stream = await self._stream_of(sock)
            except BaseException:
                try:
                    await process.end(None)
                finally:
                    sock.close()
                raise
            child = Child._create(process.pid, stream, process)
            hook = None if deliver_cancel is None else lambda: deliver_cancel(child)
            try:
                yield child
                await stream.aclose()
                await process.wait()
            except BaseException:
                # Killed before its stream closes: it never sees end of file.
                try:
                    await process.end(hook)
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                raise
        finally:
            self._blocks -= 1
            process.close()

    @asynccontextmanager
    async def _spawn_worker(self, *args: object) -> AsyncIterator[tuple[Process, socket.socket]]:
        """A spawn whose socket is the caller's alone: for RPC workers."""
        from .worker import _buffers
        from .worker._rpc import serve

        process, sock = await self._start_process(serve, args, ())
        self._blocks += 1
        _buffers.enter()  # while it lives, the memfds of big arguments are reused
        try:
            yield process, sock
            sock.close()  # end of file: the worker exits
            await process.wait()
        except BaseException:
            await process.end(None)
            raise
        finally:
            sock.close()
            self._blocks -= 1
            process.close()
            _buffers.leave()

    async def _start_process(
        self,
        target: str | Callable[..., object],
        args: tuple[object, ...],
        fds: Iterable[FileDescriptorLike],
    ) -> tuple[Process, socket.socket]:
        """Send SPAWN and wait for STARTED: the process, and our end of its socket.

        Cancelled before STARTED, it has the process killed, by its template and
        (if STARTED comes) by its pidfd, and waits (shielded, bounded) until it is
        gone before closing our end of its socket. While it runs, the template
        counts a block open (export() refuses); the caller counts its own after.
        """
        self._check_loop()
        self._blocks += 1
        try:
            return await self._start(target, args, fds)
        finally:
            self._blocks -= 1

    async def _start(
        self,
        target: str | Callable[..., object],
        args: tuple[object, ...],
        fds: Iterable[FileDescriptorLike],
    ) -> tuple[Process, socket.socket]:
        name = target_name(target)
        if not isinstance(target, str) and name.startswith("__main__:") and not self.shares_main:
            raise TypeError(
                f"target {target!r} is defined in this program's __main__, which "
                f"{self._main_owner} does not have: move it to a module, or define it in "
                f"the template with eval() and pass the string {name!r}"
            )
        # One command does it all: the template forks and the child runs at once. The
        # child confirms on its own socket.
        spawning = self._send_spawn(name, args, fds)
        sock, slot = spawning.sock, spawning.slot
        first = FirstFrame(sock)
        try:
            sock.setblocking(False)
            started = await _receive_started(first)
        except BaseException:
            # Killed before our end closes: it never sees end of file (see spawn).
            self._channel.kill(spawning.id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await _abandon(first, spawning)
            first.close()
            sock.close()
            raise
        process = None if started is None else spawning.process_of(started)
        if process is not None:
            return process, sock
        sock.close()
        if started is not None:
            _wire.close_all(started.fds)
        # It will not run, or must not without a pidfd: wait until it is gone (or was
        # never made) before saying why.
        self._channel.kill(spawning.id)
        with anyio.CancelScope(shield=True):
            await slot.event.wait()
        if slot.error is not None:
            raise slot.error
        if started is not None and started.op == _wire.ERROR:
            raise remote_error(started)
        if started is not None and started.fds_lost:
            raise OSError(
                "the pidfd of a new child was lost in transit: the kernel truncated the "
                "control message (is RLIMIT_NOFILE too low?); the child was killed"
            )
        if slot.code is None:
            self._check()
        raise BrokenTemplateError(
            f"a process forked from {self._channel.name} ended with status {slot.code} "
            f"before it could run {name}"
        )


async def _receive_started(first: FirstFrame) -> _wire.Frame | None:
    """A new child's first frame; None if it ended first (its exit slot says how)."""
    try:
        return await first.receive()
    except OSError:
        return None


async def _abandon(first: FirstFrame, spawning: Spawning) -> None:
    """Wait until a child nobody wants (its template was told to kill it) is gone.

    If it started, its STARTED makes it a process that can be killed directly (through
    its pidfd, here or at the relay), and whose death is known even while its template
    is too busy to report.
    """
    started = await _receive_started(first)
    process = None if started is None else spawning.process_of(started)
    if process is not None:
        try:
            await process.end(None)
        finally:
            process.close()
        return
    if started is not None:
        _wire.close_all(started.fds)
    await spawning.slot.event.wait()


def current_event_loop() -> object:
    """The event loop running in this thread (trio's token, or the asyncio loop); or None."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
