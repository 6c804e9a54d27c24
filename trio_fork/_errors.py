"""The exceptions trio_fork raises."""

from __future__ import annotations

import functools
from typing import final

import anyio


@final
class RemoteError(Exception):
    """An exception raised in a template or a child, carried back to the parent.

    Raised by a template command that failed there (:meth:`Template.require`,
    :meth:`Template.eval`, a ``preload``), and by :meth:`Template.spawn` when the new
    process could not start its target. An exception raised by a running target is
    not carried back: it is the child's exit status. An RPC worker does carry back
    what its function raised: a call raises it as a ``RemoteError`` (see
    :func:`open_rpc`).

    The original exception object stays in the other process; what comes back is its
    description, so tell failures apart by :attr:`type_name`. ``str()`` gives the
    type name, the message and the remote traceback.

    Attributes:
        type_name: The qualified name of the remote exception's type, such as
            ``"ModuleNotFoundError"`` or ``"mypkg.errors.ConfigError"``.
        message: ``str()`` of the remote exception.
        remote_traceback: The remote traceback, formatted as Python prints it.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(type_name, message, remote_traceback)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        head = f"{self.type_name}: {self.message}" if self.message else self.type_name
        if not self.remote_traceback:
            return head
        return f"{head}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"


@final
class BrokenTemplateError(Exception):
    """A template died, or the channel to it broke, before it could answer.

    Raised by every pending and later operation on that template, by
    :func:`open_template` when the template exits before it is ready, and by
    :meth:`Child.wait` when the exit status of a child died with its template.
    """


@final
class BrokenWorkerError(RuntimeError, anyio.BrokenWorkerProcess):
    """An RPC worker died before it answered a call.

    Raised by the calls it was running or had queued (the message says which), and by
    later calls on an :class:`RPC` whose worker is gone. A :class:`Pool` replaces the
    worker, and sends calls that provably never started to another one; so does
    :func:`run_sync`.

    A :exc:`RuntimeError`, as ``trio_parallel.BrokenWorkerError`` is, and an
    :exc:`anyio.BrokenWorkerProcess`, which ``anyio.to_process.run_sync`` raises: code
    written for either peer catches it unchanged.
    """


def closed_error(backend: str, message: str) -> Exception:
    """The error for a resource used after it was closed, as the backend's users catch it.

    :exc:`anyio.ClosedResourceError`; on trio, an instance of a subclass that is also
    :exc:`trio.ClosedResourceError` (trio is imported only there).
    """
    if backend == "trio":
        return _trio_closed_error()(message)
    return anyio.ClosedResourceError(message)


@functools.cache
def _trio_closed_error() -> type[Exception]:
    import trio

    class ClosedResourceError(trio.ClosedResourceError, anyio.ClosedResourceError):
        """Both trio's and anyio's: ``except`` clauses written for either catch it."""

    ClosedResourceError.__module__ = "trio_fork"
    ClosedResourceError.__qualname__ = "ClosedResourceError"
    return ClosedResourceError
