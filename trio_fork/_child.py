"""The parent's handle on a child: a process forked from a template, running a target."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, final

import anyio
import attrs
from anyio.abc import SocketAttribute

from ._construct import NoPublicConstructor
from ._errors import BrokenTemplateError
from ._process import signal_pidfd

if TYPE_CHECKING:
    from anyio.abc import UNIXSocketStream

    from ._channel import ExitSlot

# After a killed child is known dead (its pidfd), how long to wait for its template
# to report the exit status before leaving without it: a template busy in a long
# command, or stopped, reports late or never.
_REPORT_GRACE = 1.0


@attrs.define(eq=False)
class Process:
    """A process that a template made, as this process sees it: its pidfd and its end.

    Any number of tasks may wait for it. The template reports its exit status;
    if the template died first, the pidfd tells when the process is gone. Only the
    block that made the process closes the pidfd (:meth:`close`), after its own wait.
    """

    pid: int
    _pidfd: int | None
    _exit: ExitSlot
    _dead: bool = False
    _watching: bool = False
    _changed: anyio.Event = attrs.field(factory=anyio.Event)

    @property
    def returncode(self) -> int | None:
        return self._exit.code

    async def wait(self) -> int:
        """The exit status, once reaped; :exc:`BrokenTemplateError` if it is lost."""
        if self._exit.code is None:
            await self._exit.event.wait()
        if self._exit.code is None:
            await self._wait_dead()
            raise BrokenTemplateError(
                f"the template of process {self.pid} died and took its exit status with it"
            )
        return self._exit.code

    async def _wait_dead(self) -> None:
        """Wait until the pidfd says the process has exited (one task watches it)."""
        while not self._dead and self._pidfd is not None:
            if self._watching:
                await self._changed.wait()
                continue
            self._watching = True
            try:
                try:
                    await anyio.wait_readable(self._pidfd)
                except anyio.ClosedResourceError:
                    return  # its block closed it: the block knew it gone
                self._dead = True
            finally:
                self._watching = False
                self._changed.set()
                self._changed = anyio.Event()

    def send_signal(self, sig: int) -> None:
        check_signal(sig)
        if self._exit.code is None and self._pidfd is not None:
            signal_pidfd(self._pidfd, sig)

    async def end(self, deliver_cancel: Callable[[], Awaitable[object]] | None) -> None:
        """End the process early and wait, shielded, until it is gone.

        Bounded: once the pidfd says it is dead, the template's report is awaited
        only briefly.
        """
        with anyio.CancelScope(shield=True):
            if deliver_cancel is None:
                self.send_signal(signal.SIGKILL)
                await self._wait_reported()
            else:
                await self._deliver(deliver_cancel)

    async def _wait_reported(self) -> None:
        """Until the template reports the exit, or the pidfd says it is dead and the
        report is late; if the template died, until the pidfd says so."""
        if self._exit.code is not None:
            return
        async with anyio.create_task_group() as task_group:

            async def report_or_grace() -> None:
                await self._wait_dead()
                with anyio.move_on_after(_REPORT_GRACE):
                    await self._exit.event.wait()
                task_group.cancel_scope.cancel()

            task_group.start_soon(report_or_grace)
            await self._exit.event.wait()
            if self._exit.code is not None:
                task_group.cancel_scope.cancel()

    async def _deliver(self, deliver_cancel: Callable[[], Awaitable[object]]) -> None:
        failures: list[BaseException] = []

        async def run_hook() -> None:
            try:
                await deliver_cancel()
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                failures.append(exc)
                self.send_signal(signal.SIGKILL)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_hook)
            await self._wait_reported()
            task_group.cancel_scope.cancel()
        if failures:
            raise failures[0]

    async def wait_quietly(self) -> None:
        try:
            await self.wait()
        except BrokenTemplateError:
            pass

    def close(self) -> None:
        """Close the pidfd: the process's block is over."""
        if self._pidfd is not None:
            pidfd, self._pidfd = self._pidfd, None
            if self._watching:
                anyio.notify_closing(pidfd)
            os.close(pidfd)
            self._changed.set()


@final
@attrs.define(eq=False)
class Child(metaclass=NoPublicConstructor):
    """A process forked from a template, running its target.

    Made by :meth:`Template.spawn`, never directly. The child is not a child of this
    process but of its template, which reaps it and reports its exit status (so
    :func:`os.waitpid` cannot wait for it: use :meth:`wait`). Signals go through a
    pidfd, so they can never reach an unrelated process that was given a recycled
    pid.

    Attributes:
        pid: The child's process id.
        stream: This process's end of the child's socket: a byte stream, connected
            to the ``sock`` (or stream) its target received, that can also pass
            file descriptors (``send_fds``, ``receive_fds``). Closed when the
            ``spawn`` block ends.
    """

    pid: int
    stream: UNIXSocketStream
    _process: Process

    def __repr__(self) -> str:
        status = "running" if self.returncode is None else describe_exit(self.returncode)
        return f"<trio_fork.Child {self.pid}: {status}>"

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited and been reaped, else None.

        As in :mod:`subprocess`: the exit code, or ``-N`` if signal ``N`` killed it.
        """
        return self._process.returncode

    async def wait(self) -> int:
        """Wait until the child has exited and been reaped; its exit status.

        Any number of tasks may wait at once; each gets the status.

        Returns:
            int: The exit status, as :attr:`returncode` then has it.

        Raises:
            BrokenTemplateError: The template died first and the status died with
                it. The child is gone by then: children die with their template.
        """
        return await self._process.wait()

    def send_signal(self, sig: int) -> None:
        """Send signal ``sig`` to the child; nothing once it has exited.

        Args:
            sig: A signal number, such as :data:`signal.SIGUSR1`.

        Raises:
            TypeError: ``sig`` is not an int.
            ValueError: ``sig`` is not a signal number of this system.
        """
        check_signal(sig)  # here too: a remote child's process signals by other means
        self._process.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM: by default it ends the child, which may catch it to clean up."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL, which ends the child at once."""
        self.send_signal(signal.SIGKILL)

    async def detach_stream(self) -> socket.socket:
        """Close :attr:`stream` here and return its socket, blocking, to hand it on.

        :attr:`stream` is non-blocking, and a descriptor shares that mode with every
        copy of it: another process that gets a copy (through ``send_fds``) and reads
        it as a blocking socket fails with :exc:`BlockingIOError` whenever nothing
        has come yet. This takes the socket out of this event loop and switches it
        to blocking mode: send it on (``await other.stream.send_fds(b"s",
        [sock.fileno()])``: anyio's ``send_fds`` skips socket objects, or
        :meth:`Template.send_fds`), then close it. The child is unaffected, and
        the ``spawn`` block still waits for it.

        Raises:
            anyio.ClosedResourceError: The stream was closed.
        """
        try:
            sock = self.stream.extra(SocketAttribute.raw_socket).dup()
        except OSError:
            raise anyio.ClosedResourceError from None
        await self.stream.aclose()
        sock.setblocking(True)
        return sock


def check_signal(sig: object) -> None:
    """Refuse what is not a signal number here, before it reaches the kernel.

    0 (no signal: only checks that the process exists) is allowed, as by ``kill``.
    """
    if isinstance(sig, bool) or not isinstance(sig, int):
        raise TypeError(f"send_signal: sig must be a signal number, not {type(sig).__name__}")
    if sig != 0 and sig not in _VALID_SIGNALS:
        raise ValueError(f"send_signal: {sig} is not a signal number of this system")


_VALID_SIGNALS = frozenset(int(sig) for sig in signal.valid_signals())


def describe_exit(code: int) -> str:
    """An exit status in words: "exited with status 3", "killed by SIGKILL"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
