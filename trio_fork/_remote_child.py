"""A child on another host: its process, signalled through the relay, and its stream.

What a remote template's spawn yields differs from a local child in two ways: only
its template there knows when it has ended (the relay holds its pidfd, but reports
no death), and its stream carries bytes only.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Collection, Mapping
from io import IOBase
from typing import Any, final

import anyio
import attrs
from anyio.abc import SocketAttribute, UNIXSocketStream

from ._child import Process
from ._errors import BrokenTemplateError
from ._mux import Mux
from ._process import CLOSE_TIMEOUT

# Seconds after a SIGKILL through the relay before a remote process is taken for dead
# without its template's report; with the report's own grace, a block that kills its
# child is left within CLOSE_TIMEOUT.
_KILL_TRUSTED = CLOSE_TIMEOUT - 1.0
NO_FDS = (
    "file descriptors cannot cross hosts: a remote template's channel and its children's "
    "streams carry bytes only"
)


@attrs.define(eq=False)
class RemoteProcess(Process):
    """A process on the other host: signalled through the relay, which holds its pidfd."""

    _mux: Mux | None = None
    _stream: int = 0
    _killed: anyio.Event = attrs.field(factory=anyio.Event)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._mux is not None:
            self._mux.signal(self._stream, sig)
            if sig == signal.SIGKILL:
                self._killed.set()

    async def wait(self) -> int:
        try:
            return await super().wait()
        except BrokenTemplateError:
            if self._mux is not None:
                self._mux.check()  # the connection's own reason, if it broke
            raise

    async def _wait_dead(self) -> None:
        """Until its template reports its end, or the connection ends; bounded once killed.

        Only the template there knows when it is gone. A SIGKILL that the relay sent
        through the pidfd cannot fail, so a template too busy (or stopped) to report
        is not waited for beyond :data:`_KILL_TRUSTED` once one was sent.
        """
        async with anyio.create_task_group() as task_group:

            async def trust_the_kill() -> None:
                await self._killed.wait()
                await anyio.sleep(_KILL_TRUSTED)
                task_group.cancel_scope.cancel()

            task_group.start_soon(trust_the_kill)
            await self._exit.event.wait()
            task_group.cancel_scope.cancel()


@final
class RemoteChildStream(UNIXSocketStream):
    """A remote child's :attr:`~Child.stream`: bytes only, so no descriptor is lost.

    A local socket bridged to the child's over the connection, which carries bytes
    only: descriptors sent on the socket would be dropped on the way without a word,
    so :meth:`send_fds` and :meth:`receive_fds` raise :exc:`TypeError` instead.
    """

    def __init__(self, stream: UNIXSocketStream) -> None:
        self._stream = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def _raw_socket(self) -> socket.socket:
        sock: socket.socket = self._stream.extra(SocketAttribute.raw_socket)
        return sock

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes

    async def send_fds(self, message: bytes, fds: Collection[int | IOBase]) -> None:
        raise TypeError(NO_FDS)

    async def receive_fds(self, msglen: int, maxfds: int) -> tuple[bytes, list[int]]:
        raise TypeError(NO_FDS)
