"""The worker side of trio_fork: what runs in templates and the processes forked from them.

Standard library only: importing this package, or any module in it, loads no trio,
anyio, attrs or sniffio, so a template stays small and safe to fork. A template
starts as an ordinary import of it (or, on a host where trio_fork is not installed,
from its sources sent down the template's channel).

The functions here are the child-side API: what code running in a template (through
:meth:`trio_fork.Template.eval`) or in a child may call.
"""

from __future__ import annotations

from ._template import current as _current

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["in_template", "take_queue"]


def in_template() -> bool:
    """Whether this process is a template (code run by ``Template.eval`` is)."""
    return _current() is not None


def take_queue() -> list[Any]:
    """Take the template's queued arguments and descriptors, and clear the queue.

    AnyEvent::Fork::Serve's ``@_`` in ``run_args``: code run in a template with
    :meth:`trio_fork.Template.eval` can keep what :meth:`~trio_fork.Template.send_args`
    and :meth:`~trio_fork.Template.send_fds` queued (a log descriptor for the
    template itself, say), or take back a listener it must not hand to every child.
    Processes forked afterwards get an empty queue. Descriptors in the list are the
    caller's to close.

    Raises:
        RuntimeError: This process is not a template.
    """
    server = _current()
    if server is None:
        raise RuntimeError("take_queue() can only be called in a template (from eval code)")
    queue = list(server.queue)
    server.queue.clear()
    return queue
