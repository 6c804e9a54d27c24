"""AnyIO byte streams over pipe ends of this process: a program's stdin, stdout and stderr.

:meth:`Template.open_process` makes the pipes to the program here, not in a child of
this process, so anyio's process streams (which come with its own
``open_process``) are not to be had: these are the same streams over a plain
descriptor, made non-blocking and waited on by whichever event loop runs. Each
stream owns its descriptor and closes it in :meth:`aclose`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import final

import anyio
import anyio.abc
import anyio.lowlevel


class _FdStream:
    """A non-blocking pipe end of this process, waited on by the running event loop."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._busy = False

    @contextmanager
    def _using(self) -> Iterator[int]:
        """The descriptor, for one task at a time."""
        if self._fd < 0:
            raise anyio.ClosedResourceError
        if self._busy:
            raise anyio.BusyResourceError("using this stream")
        self._busy = True
        try:
            yield self._fd
        finally:
            self._busy = False

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            anyio.notify_closing(fd)
            os.close(fd)
        await anyio.lowlevel.checkpoint()


@final
class PipeReceiveStream(_FdStream, anyio.abc.ByteReceiveStream):
    """The read end of a pipe from a program: its stdout or stderr."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        with self._using() as fd:
            while True:
                try:
                    data = os.read(fd, max_bytes)
                    break
                except BlockingIOError:
                    await anyio.wait_readable(fd)
                except OSError as exc:
                    raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data


@final
class PipeSendStream(_FdStream, anyio.abc.ByteSendStream):
    """The write end of a pipe to a program: its stdin."""

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        with self._using() as fd, memoryview(item) as view:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await anyio.wait_writable(fd)
                except OSError as exc:
                    raise anyio.BrokenResourceError from exc


async def aclose_all(streams: Iterable[anyio.abc.AsyncResource | None]) -> None:
    """Close each of ``streams`` that is not None, shielded: for clean-up on any way out."""
    with anyio.CancelScope(shield=True):
        for stream in streams:
            if stream is not None:
                await stream.aclose()
