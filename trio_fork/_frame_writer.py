"""Frames to one RPC worker: sent at once when they can be, batched when calls crowd.

A caller must never block on a write, nor leave half a frame when it is cancelled,
and many callers at once should not cost a system call (and a wake-up of the
worker) each. So frames go into one queue of whole frames
(:class:`~trio_fork.worker._wire.Outbox`): a lone call's frame is sent at once,
nearly always in full; frames made while others are in flight wait for the writer
task, which runs after their callers and sends them in one ``sendmsg``; and what the
socket had no room for is sent by that task when it has. End of file goes out after
everything queued.

The destination is the worker's socket, or, for a worker on another host, its stream
of the ssh connection taken over from the mux (:class:`~trio_fork._mux_stream.Stream`,
which takes frames as a socket does, within its window).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from .worker import _wire

if TYPE_CHECKING:
    from ._mux_stream import Stream

# Frames held back for a batch before they are sent anyway, so that the other side
# starts on the first ones while this side is still producing the rest.
_BATCH = 32


@attrs.define(eq=False)
class FrameWriter:
    """The write side of one worker's connection; see the module's docstring."""

    outbox: _wire.Outbox
    sock: socket.socket
    direct: Stream | None = None
    _busy: bool = False
    _wake: anyio.Event = attrs.field(factory=anyio.Event)
    _write_closed: bool = False
    _eof_sent: bool = False
    _to: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._to = self.direct if self.direct is not None else self.sock

    def write(self, segments: list[_wire.Segment], *, now: bool = True) -> None:
        """Queue a frame; send it at once if ``now``, else with the others of this batch.

        Errors are not raised: a worker that cannot be written to is gone, and its
        exit fails its requests.
        """
        outbox = self.outbox
        if now and not outbox and len(segments[0][0]) == 1 and not segments[0][1]:
            # The common case, kept short: one buffer, and there is room for it.
            data = segments[0][0][0]
            try:
                sent = self._to.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return
            if sent == len(data):
                return
            segments = [([data[sent:]], [])]
        outbox.put(segments)
        if self._busy:
            if len(outbox) >= _BATCH and self._flush():
                self._busy = False
            return
        if now and self._flush():
            return
        self._busy = True
        self._wake.set()

    def close_write(self) -> None:
        """End of file to the worker, after what is queued: it exits when idle."""
        self._write_closed = True
        if not self._busy:
            self._send_eof()

    def _send_eof(self) -> None:
        self._eof_sent = True
        try:
            # Also for a stream taken over: its bridge sends the end on.
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _flush(self) -> bool:
        """Send what the socket takes; whether the queue is now empty."""
        try:
            return self.outbox.flush(self._to)
        except OSError:
            self.outbox.clear()
            return True

    async def run(self) -> None:
        """Send what could not be sent at once, as room comes."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while not self._flush():
                if self.direct is not None:
                    await self.direct.wait_writable()
                else:
                    await anyio.wait_writable(self.sock)
            self._busy = False
            if self._write_closed and not self._eof_sent:
                self._send_eof()
