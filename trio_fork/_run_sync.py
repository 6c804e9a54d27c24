"""``run_sync``: run a function in a worker process, as ``trio_parallel.run_sync`` does.

The public functions, and the default context. Calls go to a :class:`WorkerContext`
(see :mod:`._worker_context`): the one ``cache_scope()`` set for the calling task, or
the default context, which belongs to the process as trio_parallel's does: it starts
with the first call, serves every event loop run of every thread, and ends at
interpreter exit (or when :func:`configure_default_context` replaces it). A forked
copy of the process starts a default context of its own.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import sniffio

from ._call import shielded
from ._context_settings import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_IDLE_TIMEOUT,
    Settings,
    WorkerType,
    make_settings,
)
from ._event_loop_run import this_run
from ._shared import DEFAULT_BUFFER_THRESHOLD
from ._task_tree import TaskTreeValue
from ._template_workers import open_template_workers
from ._worker_context import WorkerContext, WorkerContextStatistics

if TYPE_CHECKING:
    from ._pool import PoolTemplate
    from ._remote import RemoteTemplate
    from ._template import Template

__all__ = [
    "WorkerContext",
    "WorkerContextStatistics",
    "WorkerType",
    "cache_scope",
    "configure_default_context",
    "current_default_worker_limiter",
    "default_context_statistics",
    "open_worker_context",
    "run_sync",
]

T = TypeVar("T")


async def run_sync(
    fn: Callable[..., T],
    *args: Any,
    kill_on_cancel: bool = False,
    cancellable: bool = False,
    limiter: AbstractAsyncContextManager[Any] | None = None,
) -> T:
    """Run ``fn(*args)`` in a worker process and return its result, or raise its error.

    A drop-in for ``trio_parallel.run_sync`` and ``anyio.to_process.run_sync``, on
    trio and on asyncio. Workers are forked from a template process, so a new one is
    ready in milliseconds and already has the modules its template preloaded (see
    :func:`configure_default_context`); idle workers are reused, most recently used
    first, by every event loop of the program.

    Entering is a checkpoint. Without ``kill_on_cancel`` the call cannot be
    cancelled: it runs to completion and its outcome is returned, and a trio or anyio
    cancellation takes effect at the next checkpoint; asyncio's own cancellation
    (``task.cancel()``, which ``asyncio.timeout`` and Ctrl+C under ``asyncio.run``
    use, and which comes only once) is raised once the call has completed. With
    ``kill_on_cancel``, a cancelled call kills its worker.

    Arguments, ``fn`` and results travel pickled, and exceptions as themselves:
    what a worker sends back is unpickled here, as with both peers. Give run_sync
    workers only input you would unpickle yourself; :func:`open_rpc` with
    :data:`JSON` unpickles nothing a worker sends.

    Args:
        fn: A function the worker can find by name: defined at the top level of a
            module (``__main__`` included), a built-in, or a
            :func:`functools.partial` of one. Sync functions only.
        args: Its arguments, pickled.
        kill_on_cancel: Let a cancellation kill the worker.
        cancellable: The same as ``kill_on_cancel`` (its name in anyio, and formerly
            in trio_parallel).
        limiter: An async context manager held for the call, limiting how many run
            at once (default: :func:`current_default_worker_limiter`).

    Raises:
        BaseException: Whatever ``fn`` raised, with the remote traceback attached as
            its cause (a :exc:`RemoteError`); a :exc:`RemoteError` itself if the
            exception cannot be pickled.
        BrokenWorkerError: The worker died while running the call.
        TypeError: ``fn`` is not callable, or is asynchronous.
        pickle.PicklingError: (or whatever else pickling raised) ``fn``, an
            argument or the result cannot be pickled.
    """
    run = this_run()
    await run.checkpoint_if_cancelled()
    context = _scoped.get(run.backend) or default_context()
    return await context._run(run, fn, args, kill_on_cancel or cancellable, limiter)


def current_default_worker_limiter() -> Any:
    """The limiter :func:`run_sync` uses by default: one token per CPU, per run.

    A :class:`trio.CapacityLimiter` on trio, as trio_parallel's is, and an
    :class:`anyio.CapacityLimiter` on asyncio. Change its ``total_tokens`` to allow
    more (or fewer) calls at once.
    """
    return this_run().limiter


def default_context_statistics() -> WorkerContextStatistics:
    """The statistics of the default context (or of the ``cache_scope`` in effect).

    Works outside an event loop too; all zero before the first call.
    """
    try:
        backend: str | None = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        backend = None
    context = None if backend is None else _scoped.get(backend)
    if context is None:
        context = _default.context
    if context is None:
        return WorkerContextStatistics(0, 0)
    return context.statistics()


@asynccontextmanager
async def open_worker_context(
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    init: Callable[[], object] | str = bool,
    retire: Callable[[], object] | str | int = bool,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    worker_type: WorkerType | str = WorkerType.SPAWN,
    *,
    preload: Iterable[str] = (),
    buffer_threshold: int | None = DEFAULT_BUFFER_THRESHOLD,
    template: Template | RemoteTemplate | Sequence[PoolTemplate] | None = None,
) -> AsyncIterator[WorkerContext]:
    """A context of workers of its own, isolated from the default one.

    Like ``trio_parallel.open_worker_context``. The workers are forked from a new
    template that imports ``preload``, started when the block is entered. Leaving the
    block, however it is left, waits (shielded) for the calls still running, then
    closes the workers and gives them ``grace_period`` seconds to exit before the
    template and what is left are killed. Later calls raise
    :exc:`trio.ClosedResourceError` on trio, :exc:`anyio.ClosedResourceError` on
    asyncio.

    Args:
        idle_timeout: Seconds a worker may wait for a call before it is ended
            (``math.inf``: never); checked when calls take workers, and by
            :meth:`WorkerContext.statistics`.
        init: Called without arguments in each worker before its first call: a
            picklable callable (a function defined at the top level of a module, a
            built-in, a partial of one), or ``"module:qualname"``. The default,
            :class:`bool`, does nothing.
        retire: When workers are replaced: whenever this callable (run in the worker
            after each call, given as ``init`` is) returns true, or after this many
            calls. The default, :class:`bool`, never retires them.
        grace_period: Seconds the workers are given, in all, to exit when the
            context ends (``math.inf``: no limit).
        worker_type: Accepted for compatibility with trio_parallel; see
            :class:`WorkerType`.
        preload: Modules the template imports, so that workers start with them.
        buffer_threshold: Buffers (numpy arrays and other pickle protocol 5
            buffers) of at least this many bytes in arguments and results travel in
            shared memory, copied once or not at all (see :doc:`large-data`); None:
            every byte goes in the pickle.
        template: Fork the workers from templates of yours instead: a template,
            local or remote (:func:`open_remote_template`), or a sequence of
            templates and ``(template, max)`` pairs to spread them over, as
            :func:`open_pool` takes. Each imports ``preload`` first, and stays open
            after the block. Functions travel by reference, as always: a remote host
            that lacks their module gets it by import forwarding, but this
            program's ``__main__`` is not there (:exc:`TypeError` at the call).
            Such a context belongs to the event loop that opened it, as its
            templates do; buffers go out of band only if every template takes
            descriptors (no remote one does).

    Raises:
        TypeError, ValueError: A bad argument, as trio_parallel raises them; a
            ``template`` that is not a template nor a sequence of them; ``init`` or
            ``retire`` defined in this program's ``__main__`` with ``template``.
        RemoteError: A preloaded module failed to import.
    """
    settings = make_settings(
        idle_timeout, init, retire, grace_period, worker_type, preload, buffer_threshold
    )
    async with _context(settings, template) as context:
        yield context


@asynccontextmanager
async def cache_scope(
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    init: Callable[[], object] | str = bool,
    retire: Callable[[], object] | str | int = bool,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    worker_type: WorkerType | str = WorkerType.SPAWN,
    *,
    preload: Iterable[str] = (),
    buffer_threshold: int | None = DEFAULT_BUFFER_THRESHOLD,
    template: Template | RemoteTemplate | Sequence[PoolTemplate] | None = None,
) -> AsyncIterator[None]:
    """Make :func:`run_sync` use a new context of its own in this block's task tree.

    Like ``trio_parallel.cache_scope``: for the duration of the block, a context
    made with these arguments (those of :func:`open_worker_context`) replaces the
    default one for :func:`run_sync` and :func:`default_context_statistics`, in
    this task and in the tasks below it. On trio that is the task tree: tasks
    started into a nursery opened inside the block, whoever starts them, and not
    those started from inside into a nursery opened outside it. On asyncio, which
    has no task tree, it is the tasks started from inside the block (they copy its
    context). Explicit contexts are not affected; leaving the block closes its
    context as leaving :func:`open_worker_context` does. With ``template``, the
    calls of the block go to workers forked from those templates, remote ones
    included.
    """
    settings = make_settings(
        idle_timeout, init, retire, grace_period, worker_type, preload, buffer_threshold
    )
    backend = sniffio.current_async_library()
    async with _context(settings, template) as context:
        with _scoped.being(backend, context):
            yield


def configure_default_context(
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    init: Callable[[], object] | str = bool,
    retire: Callable[[], object] | str | int = bool,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    worker_type: WorkerType | str = WorkerType.SPAWN,
    *,
    preload: Iterable[str] = (),
    buffer_threshold: int | None = DEFAULT_BUFFER_THRESHOLD,
) -> None:
    """Configure the default context, which every :func:`run_sync` of the program uses.

    The arguments are those of :func:`open_worker_context`; ``preload`` in
    particular makes every worker start with those modules imported. Call it from
    the main thread, before the first :func:`run_sync` or between event loop runs.
    A default context that has workers is replaced, with a :exc:`UserWarning` (as
    trio_parallel warns): its idle workers end now, the running ones when their
    calls finish, and its template then (or at interpreter exit).

    Raises:
        RuntimeError: Not called from the main thread.
        TypeError, ValueError: A bad argument.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "configure_default_context() must be called from the main thread, not from "
            f"thread {threading.current_thread().name!r}"
        )
    settings = make_settings(
        idle_timeout, init, retire, grace_period, worker_type, preload, buffer_threshold
    )
    with _default.lock:
        previous = _default.context
        _default.context = None
        _default.settings = settings
    if previous is not None:
        stats = previous.statistics()
        workers = stats.idle_workers + stats.running_workers
        if workers:
            warnings.warn(
                f"configure_default_context() replaced a default context that has {workers} "
                f"worker(s) ({stats.running_workers} running): they end when their calls "
                "finish",
                UserWarning,
                stacklevel=2,
            )
        previous._retire()


# The default context, and cache_scope's.


class _Default:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.context: WorkerContext | None = None
        self.settings: Settings = make_settings(
            DEFAULT_IDLE_TIMEOUT, bool, bool, DEFAULT_GRACE_PERIOD, WorkerType.SPAWN, ()
        )


_default = _Default()
_scoped: TaskTreeValue[WorkerContext] = TaskTreeValue("trio_fork cache_scope")


def default_context() -> WorkerContext:
    context = _default.context
    if context is None:
        with _default.lock:
            context = _default.context
            if context is None:
                context = _default.context = WorkerContext._create(_default.settings)
    return context


def end_default_context() -> None:
    """End the default context now (its workers and template); the next call starts anew.

    For tests, which must leave no process behind. Blocking.
    """
    with _default.lock:
        context, _default.context = _default.context, None
    if context is not None:
        context._shutdown()


@asynccontextmanager
async def _context(
    settings: Settings, template: Template | RemoteTemplate | Sequence[PoolTemplate] | None
) -> AsyncIterator[WorkerContext]:
    if template is not None:
        async with open_template_workers(template, settings) as workers:
            context = WorkerContext._create(settings, over=workers)
            try:
                yield context
            finally:
                context._closed = True
                await shielded(workers.drain)
        return
    context = WorkerContext._create(settings)
    try:
        # Started now, so that a preload that fails to import fails here.
        await context._template()
        yield context
    finally:
        await shielded(context._aclose)


def _forget_in_child() -> None:
    # A forked copy of this process starts a default context of its own.
    _default.lock = threading.Lock()
    _default.context = None


os.register_at_fork(after_in_child=_forget_in_child)
