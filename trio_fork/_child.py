"""The parent's handle on a child: a process forked from a template, running a target."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, final

import anyio
import attrs

from ._errors import BrokenTemplateError

if TYPE_CHECKING:
    from anyio.abc import UNIXSocketStream

    from ._channel import ExitSlot


@final
@attrs.define(eq=False, init=False)
class Child:
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
    _pidfd: int | None
    _exit: ExitSlot

    @classmethod
    def _create(cls, pid: int, stream: UNIXSocketStream, pidfd: int, exit: ExitSlot) -> Child:
        self = cls.__new__(cls)
        self.pid = pid
        self.stream = stream
        self._pidfd = pidfd
        self._exit = exit
        return self

    def __repr__(self) -> str:
        status = "running" if self.returncode is None else describe_exit(self.returncode)
        return f"<trio_fork.Child {self.pid}: {status}>"

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited and been reaped, else None.

        As in :mod:`subprocess`: the exit code, or ``-N`` if signal ``N`` killed it.
        """
        return self._exit.code

    async def wait(self) -> int:
        """Wait until the child has exited and been reaped; its exit status.

        Returns:
            int: The exit status, as :attr:`returncode` then has it.

        Raises:
            BrokenTemplateError: The template died first and the status died with
                it. The child is gone by then: children die with their template.
        """
        if self._exit.code is None:
            await self._exit.event.wait()
        if self._exit.code is None:
            if self._pidfd is not None:
                await anyio.wait_readable(self._pidfd)
            self._close_pidfd()
            raise BrokenTemplateError(
                f"the template of child {self.pid} died and took its exit status with it"
            )
        self._close_pidfd()
        return self._exit.code

    def send_signal(self, sig: int) -> None:
        """Send signal ``sig`` to the child; nothing once it has exited.

        Args:
            sig: A signal number, such as :data:`signal.SIGUSR1`.
        """
        if self._exit.code is not None or self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """Send SIGTERM: by default it ends the child, which may catch it to clean up."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL, which ends the child at once."""
        self.send_signal(signal.SIGKILL)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _abort(self, deliver_cancel: Callable[[Child], Awaitable[object]] | None) -> None:
        """End the child early and wait, shielded, until it is reaped.

        The stream stays open until then, so ``deliver_cancel`` may ask the child to
        stop with a message as well as with a signal.
        """
        with anyio.CancelScope(shield=True):
            try:
                if deliver_cancel is None:
                    self.kill()
                    await self._wait_quietly()
                else:
                    await self._deliver(deliver_cancel)
            finally:
                await self.stream.aclose()

    async def _deliver(self, deliver_cancel: Callable[[Child], Awaitable[object]]) -> None:
        failures: list[BaseException] = []

        async def run_hook() -> None:
            try:
                await deliver_cancel(self)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                failures.append(exc)
                self.kill()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_hook)
            await self._wait_quietly()
            task_group.cancel_scope.cancel()
        if failures:
            raise failures[0]

    async def _wait_quietly(self) -> None:
        try:
            await self.wait()
        except BrokenTemplateError:
            pass


def describe_exit(code: int) -> str:
    """An exit status in words: "exited with status 3", "killed by SIGKILL"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
