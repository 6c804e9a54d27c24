"""``run_sync``: run a function in a worker process, as ``trio_parallel.run_sync`` does.

Workers are forked from a template by a pool whose function
(:func:`trio_fork.worker._apply.apply`) calls the function that comes with each call.
``run_sync`` uses a default pool that belongs to the current event loop run: it starts
with the first call and ends with the run (in a trio system task, or an asyncio task
that ``asyncio.run`` cancels at the end). ``open_worker_context`` makes a pool of
one's own, for isolation or other settings.

A call that refers to this program's ``__main__`` loads it into the template first
(see :mod:`._main_module`); the workers started before are replaced. Functions in
other modules (test modules too) are imported by the worker, from the ``sys.path``
the template was given.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio
import anyio.lowlevel
import attrs
import sniffio

from ._arguments import check_reference, module_names
from ._call import Request, abort, make_request, outcome, wait_for, wait_until
from ._construct import NoPublicConstructor
from ._main_module import load_main, refers_to_main
from ._open import open_template
from ._pool import run_pool
from ._pool_state import Limits
from ._rpc import prepare_template, worker_spec
from .worker._apply import apply, loading
from .worker._serializers import PICKLE

if TYPE_CHECKING:
    from ._pool import Pool
    from ._remote import RemoteTemplate
    from ._template import Template

T = TypeVar("T")

_DEFAULT_IDLE_TIMEOUT = 600.0


@final
@attrs.frozen
class WorkerContextStatistics:
    """A snapshot of a :class:`WorkerContext`, as ``trio_parallel`` reports it.

    Attributes:
        idle_workers: Workers ready and waiting for a call.
        running_workers: Workers running a call.
    """

    idle_workers: int
    running_workers: int


@final
@attrs.define(eq=False)
class WorkerContext(metaclass=NoPublicConstructor):
    """Workers of one configuration, made by :func:`open_worker_context`."""

    _template: Template | RemoteTemplate
    _pool: Pool
    _main_loaded: bool
    _main_lock: anyio.Lock = attrs.field(factory=anyio.Lock)
    # The backend's own, looked up once: anyio's looks the backend up each time.
    _checkpoint_if_cancelled: Callable[[], Awaitable[None]] = attrs.field(
        factory=lambda: _native_checkpoint_if_cancelled()
    )

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<trio_fork.WorkerContext {stats.idle_workers} idle, {stats.running_workers} running>"
        )

    async def run_sync(
        self,
        fn: Callable[..., T],
        *args: Any,
        kill_on_cancel: bool = False,
        limiter: AbstractAsyncContextManager[Any] | None = None,
    ) -> T:
        """Run ``fn(*args)`` in a worker of this context (see :func:`run_sync`)."""
        await self._checkpoint_if_cancelled()
        request = _request(fn, args, kill_on_cancel)
        if not self._main_loaded and b"__main__" in request.payload:
            await self._load_main_for(fn, args)
        if limiter is None:
            limiter = current_default_worker_limiter()
        wait = wait_for if kill_on_cancel else _wait_shielded
        if isinstance(limiter, anyio.CapacityLimiter):
            # The same as "async with limiter", without its schedule point when a
            # token is free: the wait for the result yields anyway.
            try:
                limiter.acquire_nowait()
            except anyio.WouldBlock:
                await limiter.acquire()
            try:
                self._pool._submit(request)
                await wait(request, self._pool._withdraw)
            finally:
                limiter.release()
        else:
            async with limiter:
                self._pool._submit(request)
                await wait(request, self._pool._withdraw)
        return outcome(request, PICKLE, originals=True)  # type: ignore[no-any-return]

    def statistics(self) -> WorkerContextStatistics:
        """How many workers are idle and how many are running calls."""
        stats = self._pool.statistics()
        return WorkerContextStatistics(stats.idle_workers, stats.busy_workers)

    async def _load_main_for(self, *objects: object) -> None:
        if not refers_to_main(objects):
            return  # "__main__" was only data
        async with self._main_lock:
            if not self._main_loaded:
                await load_main(self._template)
                self._main_loaded = True
                self._pool._renew()


@asynccontextmanager
async def open_worker_context(
    *,
    preload: Iterable[str] = (),
    idle_timeout: float = _DEFAULT_IDLE_TIMEOUT,
    init: Callable[[], object] | str | None = None,
    retire: int | Callable[[], object] | str | None = None,
    template: Template | RemoteTemplate | None = None,
) -> AsyncIterator[WorkerContext]:
    """A context of workers of its own, isolated from the default one.

    Like ``trio_parallel.open_worker_context``. The workers are forked from a new
    template that imports ``preload``; leaving the block waits for the calls still
    running, then ends the workers and the template.

    Args:
        preload: Modules the template imports, so that workers start with them.
        idle_timeout: Seconds a worker may wait for a call before it exits
            (``math.inf``: never).
        init: Called without arguments in each worker before its first call: a
            function defined at the top level of a module, or ``"module:qualname"``.
        retire: When workers are replaced: after this many calls, or whenever this
            function (run in the worker after each call, like ``init``) returns true.
        template: Fork the workers from this template instead, local or remote
            (see :func:`open_remote_template`), which imports ``preload`` first and
            stays open after the block. On a remote template, functions travel by
            reference as locally, and their modules are forwarded if the other host
            lacks them; this program's ``__main__`` is found there only if it was run
            as a module (``python -m``).

    Raises:
        RemoteError: A preloaded module failed to import.
    """
    settings = _settings(preload, idle_timeout, init, retire)
    if template is not None:
        if settings.preload:
            await template.require(*settings.preload)
        async with _context_on(template, settings) as context:
            yield context
        return
    async with _open_context(settings) as context:
        yield context


def configure_default_context(
    *,
    preload: Iterable[str] = (),
    idle_timeout: float = _DEFAULT_IDLE_TIMEOUT,
    init: Callable[[], object] | str | None = None,
    retire: int | Callable[[], object] | str | None = None,
) -> None:
    """Set what the default context of each event loop run is made with.

    The arguments are those of :func:`open_worker_context`. Takes effect for runs
    whose default context does not exist yet: call it before the first
    :func:`run_sync`.

    Raises:
        RuntimeError: This event loop run's default context already exists.
    """
    settings = _settings(preload, idle_timeout, init, retire)
    try:
        exists = _this_run().default is not None
    except RuntimeError:
        exists = False  # not in an event loop: nothing can exist yet
    if exists:
        raise RuntimeError(
            "the default worker context of this run already exists: call "
            "configure_default_context() before the first run_sync()"
        )
    global _default_settings
    _default_settings = settings


async def run_sync(
    fn: Callable[..., T],
    *args: Any,
    kill_on_cancel: bool = False,
    limiter: AbstractAsyncContextManager[Any] | None = None,
) -> T:
    """Run ``fn(*args)`` in a worker process and return its result, or raise its error.

    A drop-in for ``trio_parallel.run_sync``, on trio and on asyncio. Workers are
    forked from a template process, so a new one is ready in milliseconds and
    already has the modules its template preloaded (see
    :func:`configure_default_context`); idle workers are reused.

    Entering is a checkpoint. Without ``kill_on_cancel`` the call cannot be
    cancelled: it runs to completion and its outcome is returned (the cancellation
    takes effect at the next checkpoint). With it, a cancelled call that is running
    kills its worker, and one still waiting for a worker is dropped.

    Args:
        fn: A function the worker can find by name: defined at the top level of a
            module (``__main__`` included), or a built-in.
        args: Its arguments, pickled.
        kill_on_cancel: Let a cancellation kill the worker.
        limiter: An async context manager held for the call, limiting how many run
            at once (default: :func:`current_default_worker_limiter`).

    Raises:
        BaseException: Whatever ``fn`` raised, with the remote traceback attached as
            its cause (a :exc:`RemoteError`); a :exc:`RemoteError` itself if the
            exception cannot be pickled.
        BrokenWorkerError: The worker died while running the call.
        TypeError: ``fn`` or an argument cannot be pickled.
    """
    run = _this_run()
    default = run.default
    if default is None or default.context is None:
        context = await _default_context(run)
    else:
        context = default.context
    if limiter is None:
        limiter = run.limiter
    return await context.run_sync(fn, *args, kill_on_cancel=kill_on_cancel, limiter=limiter)


def current_default_worker_limiter() -> anyio.CapacityLimiter:
    """The limiter :func:`run_sync` uses by default: one token per CPU, per run.

    Change its ``total_tokens`` to allow more (or fewer) calls at once.
    """
    return _this_run().limiter


def default_context_statistics() -> WorkerContextStatistics:
    """The statistics of this run's default context (all zero before it starts)."""
    default = _this_run().default
    if default is None or default.context is None:
        return WorkerContextStatistics(0, 0)
    return default.context.statistics()


# What belongs to each event loop run: the default context and the default limiter.


@attrs.frozen
class _Settings:
    preload: tuple[str, ...]
    limits: Limits
    init: Callable[[], object] | str | None
    retire: Callable[[], object] | str | None


@attrs.define(eq=False)
class _Default:
    ready: anyio.Event = attrs.field(factory=anyio.Event)
    context: WorkerContext | None = None
    error: BaseException | None = None
    owner: object = None
    """The asyncio task that holds the context open (kept so it is not collected)."""


@attrs.define(eq=False)
class _Run:
    limiter: anyio.CapacityLimiter = attrs.field(
        factory=lambda: anyio.CapacityLimiter(os.cpu_count() or 1)
    )
    default: _Default | None = None


_default_settings: _Settings | None = None
# Keyed like anyio's RunVar (by trio token or asyncio loop), without its cost on
# every call.
_runs: weakref.WeakKeyDictionary[object, _Run] = weakref.WeakKeyDictionary()


def _this_run() -> _Run:
    key: object
    if sniffio.current_async_library() == "trio":
        key = sys.modules["trio"].lowlevel.current_trio_token()
    else:
        key = asyncio.get_running_loop()
    run = _runs.get(key)
    if run is None:
        run = _runs[key] = _Run()
    return run


async def _default_context(run: _Run) -> WorkerContext:
    default = run.default
    if default is None:
        run.default = default = _Default()
        settings = _default_settings or _settings((), _DEFAULT_IDLE_TIMEOUT, None, None)
        if sniffio.current_async_library() == "trio":
            sys.modules["trio"].lowlevel.spawn_system_task(_hold_default, run, default, settings)
        else:
            default.owner = asyncio.get_running_loop().create_task(
                _hold_default(run, default, settings), name="trio_fork default worker context"
            )
    if default.context is None:
        await default.ready.wait()
    if default.error is not None:
        raise default.error
    assert default.context is not None
    return default.context


async def _hold_default(run: _Run, default: _Default, settings: _Settings) -> None:
    """Hold the default context open until the run ends (and this task is cancelled)."""
    try:
        async with _open_context(settings) as context:
            default.context = context
            default.ready.set()
            await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        raise
    except BaseException as exc:
        # Every waiting caller gets the error; the next call tries again.
        default.error = exc
        default.ready.set()
        if run.default is default:
            run.default = None


# Shared by both kinds of contexts.


@asynccontextmanager
async def _open_context(settings: _Settings) -> AsyncIterator[WorkerContext]:
    async with (
        open_template(preload=settings.preload) as template,
        _context_on(template, settings) as context,
    ):
        yield context


@asynccontextmanager
async def _context_on(
    template: Template | RemoteTemplate, settings: _Settings
) -> AsyncIterator[WorkerContext]:
    """Workers forked from ``template``, which has imported ``settings.preload``."""
    if loading.main:
        # The program's top-level code is running in a template, which is loading
        # it for its workers: going on would start templates without end.
        raise RuntimeError(
            "trio_fork workers were requested while a worker template was loading "
            "this program's main module: put the code that runs the program under "
            "'if __name__ == \"__main__\":'"
        )
    spec = worker_spec(
        apply,
        init=settings.init,
        init_args=(),
        serializer=PICKLE,
        events=False,
        exceptions=True,
        retire=settings.retire,
    )
    await prepare_template(template, False)
    await template.require("trio_fork.worker._apply")
    main_loaded = False
    if refers_to_main((settings.init, settings.retire)):
        await load_main(template)
        main_loaded = True
    async with run_pool(template, settings.limits, spec) as pool:
        yield WorkerContext._create(template, pool, main_loaded)


def _settings(
    preload: Iterable[str],
    idle_timeout: float,
    init: Callable[[], object] | str | None,
    retire: int | Callable[[], object] | str | None,
) -> _Settings:
    modules = tuple(module_names(preload, "preload"))
    if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)):
        raise TypeError(
            f"idle_timeout must be a number of seconds, not {type(idle_timeout).__name__}"
        )
    if not idle_timeout >= 0:
        raise ValueError(f"idle_timeout must be a non-negative number of seconds: {idle_timeout!r}")
    calls: int | None = None
    check: Callable[[], object] | str | None = None
    if isinstance(retire, bool):
        raise TypeError("retire must be a number of calls or a function, not a bool")
    if isinstance(retire, int):
        if retire < 1:
            raise ValueError(f"retire must be at least 1 call, not {retire}")
        calls = retire
    elif retire is not None:
        check = retire
    for name, value in (("init", init), ("retire", check)):
        if value is not None:
            check_reference(value, name)
    limits = Limits(max=None, idle=0, load=1, start=0.0, stop=float(idle_timeout), retire=calls)
    return _Settings(modules, limits, init, check)


async def _wait_shielded(request: Request, withdraw: object = None) -> None:
    """Wait for a call that cancellation must not stop.

    The same as waiting in a shielded cancel scope, without paying for one on every
    call: the scope is entered only when a cancellation comes. (``withdraw`` is
    there to match :func:`wait_for`: such a call is never taken back.) The call then runs to
    completion and its outcome is returned; the cancellation, still pending, takes
    effect at the caller's next checkpoint.
    """
    try:
        await wait_until(request, lambda: request.done)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await wait_until(request, lambda: request.done)
    except BaseException:
        # KeyboardInterrupt and the like: the worker may be stuck; do not wait for it.
        with anyio.CancelScope(shield=True):
            await abort(request, None, kill=True)
        raise


def _request(fn: Callable[..., Any], args: tuple[Any, ...], kill_on_cancel: bool) -> Request:
    if not callable(fn):
        raise TypeError(f"run_sync: fn must be callable, not {type(fn).__name__}")
    try:
        function = _pickled_function(fn)
    except Exception as exc:
        raise TypeError(
            f"run_sync: {fn!r} cannot be sent to a worker ({exc}): pass a function "
            "defined at the top level of a module"
        ) from exc
    try:
        # pickle itself rather than PICKLE.dumps(): this is every call's path.
        return Request(pickle.dumps((function, *args), pickle.HIGHEST_PROTOCOL), kill_on_cancel)
    except Exception:
        pass
    try:
        return make_request(PICKLE, args, kill_on_cancel, listen=False)
    except TypeError as exc:
        raise TypeError(f"run_sync: {exc}") from exc.__cause__


# Plain functions and built-ins (those that pickle by reference, and live as long as
# their module) are pickled once; other callables, such as partials, every time.
_pickled_functions: dict[Callable[..., Any], bytes] = {}
_MAX_PICKLED_FUNCTIONS = 256


def _pickled_function(fn: Callable[..., Any]) -> bytes:
    if type(fn) not in (types.FunctionType, types.BuiltinFunctionType):
        return pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
    pickled = _pickled_functions.get(fn)
    if pickled is None:
        pickled = pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
        if len(_pickled_functions) >= _MAX_PICKLED_FUNCTIONS:
            _pickled_functions.clear()
        _pickled_functions[fn] = pickled
    return pickled


def _native_checkpoint_if_cancelled() -> Callable[[], Awaitable[None]]:
    if sniffio.current_async_library() == "trio":
        return sys.modules["trio"].lowlevel.checkpoint_if_cancelled  # type: ignore[no-any-return]
    return anyio.lowlevel.checkpoint_if_cancelled
