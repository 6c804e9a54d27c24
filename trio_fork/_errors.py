"""The exceptions trio_fork raises."""

from __future__ import annotations

from typing import final


@final
class RemoteError(Exception):
    """An exception raised in a template or a child, carried back to the parent.

    The original exception object stays in the other process; what comes back is its
    description.

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

    Raised by every pending and later operation on that template, and by
    :meth:`Child.wait` when the exit status of a child died with its template.
    """


@final
class BrokenWorkerError(Exception):
    """An RPC worker died before it answered a call.

    Raised by the calls it was running or had queued (the message says which), and by
    later calls on an :class:`RPC` whose worker is gone. A :class:`Pool` replaces the
    worker, and sends calls that provably never started to another one.
    """
