"""Adopting a template whose control channel another process handed over."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from ._arguments import FileDescriptorLike, dup_fd
from ._channel import Channel, remote_error
from ._errors import BrokenTemplateError
from ._process import check_ready
from ._template import Template
from ._transport import Transport, receive_frame
from .worker import _wire


@asynccontextmanager
async def adopt_template(channel: FileDescriptorLike) -> AsyncIterator[Template]:
    """Take over a template from the channel socket that :meth:`Template.export` gave.

    The counterpart of AnyEvent::Fork's ``new_from_fh``. The template is unchanged:
    it has whatever was imported, evaluated and queued in it before the hand-over,
    and the full :class:`Template` API. It is not a child of this process, but
    :attr:`Template.pid` is its real pid, asked from the template itself.

    Leaving the block ends the template and everything it started (its channel
    closes, as when an :func:`open_template` block ends), and waits until it has
    exited; whoever made it reaps it. The exporter's block can also end it first:
    then this side gets :exc:`BrokenTemplateError`.

    Args:
        channel: The socket (or its descriptor) received from the exporter. It is
            duplicated: close your copy once the template is adopted, and do not
            use it for anything else.

    Raises:
        TypeError: ``channel`` is not a Unix stream socket.
        BrokenTemplateError: The template has ended, or ``channel`` does not lead to
            one (nothing answered within 5 seconds, or not as a template does).
    """
    fd = dup_fd(channel, "adopt_template", 0)
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        sock = None
    if sock is None or sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        if sock is not None:
            sock.close()
        raise TypeError(f"adopt_template: {channel!r} is not a Unix stream socket")
    try:
        sock.setblocking(False)
        pid, pidfd = await _hello(sock)
    except BaseException:
        sock.close()
        raise
    template = Template._create(Channel(Transport(sock), ""), pid, pidfd, None, None)
    async with template._serving():
        yield template


async def _hello(sock: socket.socket) -> tuple[int, int]:
    """The template's pid and a pidfd, asked with HELLO; reads nothing past the answer.

    A template answers at once: an exported one has nothing left to do. Whatever
    does not answer in time is not a template (or not one that can be adopted).
    """
    frame: _wire.Frame | None = None
    try:
        with anyio.move_on_after(HELLO_TIMEOUT) as waited:
            request = memoryview(_wire.HEADER.pack(_wire.HELLO, 0, _HELLO_ID, 0))
            while request:
                try:
                    request = request[sock.send(request) :]
                except BlockingIOError:
                    await anyio.wait_writable(sock)
            while True:
                frame = await receive_frame(sock)
                # Exit reports of processes the exporter forked may still be on their way.
                if frame is None or frame.op != _wire.EXITED:
                    break
    except OSError as exc:
        raise BrokenTemplateError("the adopted template died or its channel broke") from exc
    if waited.cancelled_caught:
        raise BrokenTemplateError(
            f"the socket given to adopt_template does not lead to a template: nothing "
            f"answered within {HELLO_TIMEOUT:g} s"
        )
    if frame is None:
        raise BrokenTemplateError("the adopted template has ended (its channel is closed)")
    if frame.op == _wire.ERROR:
        raise remote_error(frame)
    if frame.op != _wire.READY or frame.id != _HELLO_ID or len(frame.fds) != 1:
        _wire.close_all(frame.fds)
        raise BrokenTemplateError(
            f"the socket given to adopt_template does not lead to a template (it answered "
            f"{frame.op})"
        )
    return check_ready(frame, "adopted template"), frame.fds[0]


# Any id but 0 (an unasked READY); the adopter's own commands count from 1.
_HELLO_ID = 0xFFFFFFFF
HELLO_TIMEOUT = 5.0
"""How long :func:`adopt_template` waits for the template to answer."""
