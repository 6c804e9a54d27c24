"""The exceptions trio_fork raises."""

from __future__ import annotations

from typing import final


@final
class RemoteError(Exception):
    """An exception raised in a template or a child, carried back to the parent.

    Raised by a template command that failed there (:meth:`Template.require`,
    :meth:`Template.eval`, a ``preload``), and by :meth:`Template.spawn` when the new
    process could not start its target. An exception raised by a running target is
    not carried back: it is the child's exit status.

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
