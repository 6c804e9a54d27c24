"""The parent's side of out-of-band buffers: what a call sends, and what it gets back.

Arguments are serialized once, when the call is made, and may be sent more than once
(a pool sends a call that never started to another worker when its worker dies), so
a request keeps its descriptors, sends copies of them, and closes them when it is
collected. Buffers that come back are mapped as soon as their frame arrives (see
:func:`open_frame`): from then on their lifetime is the objects', whether or not
anyone ever takes the result or the event.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._transport import ProtocolError
from .worker import _buffers
from .worker._serializers import PickleSerializer

if TYPE_CHECKING:
    from ._arguments import Serializer
    from .worker._wire import Frame


class Descriptors:
    """Descriptors of a request's buffers, closed with it (or by :meth:`close`)."""

    __slots__ = ("fds",)

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def copies(self) -> list[int]:
        """Duplicates to send (the frame's outbox closes them once sent)."""
        copies: list[int] = []
        try:
            for fd in self.fds:
                copies.append(os.dup(fd))
        except BaseException:
            _buffers._close(copies)
            raise
        return copies

    def take(self) -> list[int]:
        """The descriptors themselves, for a frame that sends them once (and closes them)."""
        fds, self.fds = self.fds, []
        return fds

    def close(self, _close: Callable[[list[int]], None] = _buffers._close) -> None:
        # Bound at definition: at interpreter exit, module globals may be gone.
        fds, self.fds = self.fds, []
        _close(fds)

    __del__ = close


def carries_fds(template: object) -> bool:
    """Whether workers of ``template`` can be sent descriptors.

    A local template's can. A remote one's cannot: their sockets are bridged over a
    byte stream (even though the local end of that bridge is a Unix socket).
    """
    from ._template import Template

    return isinstance(template, Template) and template._channel.carries_fds


def buffer_threshold(serializer: object, threshold: int | None) -> int | None:
    """The threshold of workers with ``serializer``: buffers go out of band in pickles only."""
    return threshold if isinstance(serializer, PickleSerializer) else None


def dumps(
    serializer: Serializer, obj: Any, threshold: int | None
) -> tuple[bytes, Descriptors | None]:
    """``obj`` serialized, with its big buffers out of band if ``threshold`` is set."""
    if threshold is None:
        return serializer.dumps(obj), None
    payload, fds = _buffers.dumps(obj, threshold)
    return payload, Descriptors(fds) if fds else None


def open_frame(frame: Frame) -> Any:
    """A RESULT or EVENT frame's payload, with its buffers mapped if it has any.

    Raises:
        ProtocolError: Its descriptors were lost in transit, or do not match it.
    """
    if frame.fds_lost:
        raise ProtocolError(
            "the descriptors of a reply were lost in transit (is RLIMIT_NOFILE too low?)"
        )
    if not frame.fds:
        return frame.payload
    try:
        return _buffers.receive(frame.payload, frame.fds)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def loads(serializer: Serializer, value: Any) -> Any:
    """What :func:`open_frame` returned, deserialized."""
    if type(value) is tuple:
        return _buffers.loads(*value)
    return serializer.loads(value)
