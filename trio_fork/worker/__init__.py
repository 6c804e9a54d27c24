"""The worker side of trio_fork: what runs in templates and the processes forked from them.

Standard library only: importing this package, or any module in it, loads no trio,
anyio, attrs or sniffio, so a template stays small and safe to fork. A template
starts as an ordinary import of it (or, on a host where trio_fork is not installed,
from its sources sent down the template's channel).

The functions here are the child-side API: what code running in a template (through
:meth:`trio_fork.Template.eval`) or in a child may call; :func:`emit` and
:func:`retire` are for RPC workers (those of :func:`trio_fork.open_rpc`,
:func:`trio_fork.open_pool` and :func:`trio_fork.run_sync`).
"""

from __future__ import annotations

import sys

from ._template import Server as _Server

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._rpc import Worker

__all__ = ["emit", "in_template", "retire", "take_queue"]


def in_template() -> bool:
    """Whether this process is a template (code run by ``Template.eval`` is)."""
    return _Server.current is not None


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
    server = _Server.current
    if server is None:
        raise RuntimeError("take_queue() can only be called in a template (from eval code)")
    queue = list(server.queue)
    server.queue.clear()
    return queue


def emit(event: Any) -> None:
    """Send ``event`` to the parent, whenever: in a call or outside one.

    AnyEvent::Fork::RPC's ``event``. The parent receives it from
    :meth:`trio_fork.RPC.events` (or :meth:`trio_fork.Pool.events`), serialized as
    the worker's arguments and results are. In a sync worker any thread may call it;
    in an async worker, the event loop's thread (it never waits: the event is sent
    as soon as the socket takes it).

    Raises:
        RuntimeError: This process is not an RPC worker.
    """
    _worker("emit").send_event(event)


def retire() -> None:
    """Ask to be replaced: this RPC worker takes no call after those it has.

    AnyEvent::Fork::Pool's worker-side retirement, for a worker that knows it should
    go (it leaks, or grew too big). A sync worker exits after its current call (or
    its next, if none runs); an async one once the calls it runs are done. A pool
    starts another in its place when calls need one; an :func:`trio_fork.open_rpc`
    takes no more calls (they raise :exc:`anyio.ClosedResourceError`). The worker's
    ``done`` hook runs before it exits.

    Raises:
        RuntimeError: This process is not an RPC worker.
    """
    _worker("retire").retire()


def _worker(what: str) -> Worker:
    # Loaded only in RPC workers: templates never import the RPC loop for this.
    rpc = sys.modules.get(f"{__name__}._rpc")
    worker = None if rpc is None else rpc.Worker.current
    if worker is None:
        raise RuntimeError(f"{what}() can only be called in an RPC worker")
    return worker  # type: ignore[no-any-return]
