"""A worker context: the workers that ``run_sync`` calls go to, of one configuration.

trio_parallel's ``WorkerContext``. The context owns a template (a
:class:`~trio_fork.TemplateHandle`, so that it outlives event loops: the default
context serves every run of the program, in every thread) and the workers forked
from it (:mod:`._workers`): idle ones most recently used first, each borrowed by one
call at a time and talked to with the caller's event loop. If the template dies (the
OOM killer, say), the next worker that is needed comes from a new one.
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio
import attrs

from ._call import cancellation_kept, shielded, unwrap_error
from ._construct import NoPublicConstructor
from ._context_settings import Settings, WorkerType
from ._errors import BrokenTemplateError, BrokenWorkerError, closed_error
from ._event_loop_run import Run, this_run
from ._handle import TemplateHandle, _setup_now, start_template
from ._main_module import load_main, main_location, refers_to_main
from ._outofband import Descriptors
from ._run_sync_payload import request_payload
from ._template_workers import TemplateWorkers
from ._transport import ProtocolError, unpack_strings
from ._workers import Worker, WorkerDied, invoke_frame, start_worker, wait_reaped
from .worker import _buffers, _wire
from .worker._apply import become_worker
from .worker._rpc import loading
from .worker._wire import RESULT

if TYPE_CHECKING:
    from .worker._wire import Frame

T = TypeVar("T")


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
    """Workers of one configuration, made by :func:`open_worker_context` (or the default
    context of :func:`run_sync`)."""

    _settings: Settings
    _idle: deque[Worker] = attrs.field(factory=deque)
    _running: set[Worker] = attrs.field(factory=set)
    _handle: TemplateHandle | None = None
    # Starting and replacing the template, and loading the main module into it, from
    # any thread.
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _closed: bool = False
    _main_loaded_in: TemplateHandle | None = None
    # Set when the last running call is done, for a close that waits for them.
    _drained: anyio.Event | None = None
    _owner: int = attrs.field(factory=os.getpid)
    # The workers of a context over templates of the caller's, instead of the above.
    _over: TemplateWorkers | None = None

    def __attrs_post_init__(self) -> None:
        _contexts.add(self)

    def __repr__(self) -> str:
        stats = self.statistics()
        state = "closed, " if self._closed else ""
        return (
            f"<trio_fork.WorkerContext {state}{stats.idle_workers} idle, "
            f"{stats.running_workers} running>"
        )

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle worker is kept."""
        return self._settings.idle_timeout

    @property
    def init(self) -> object:
        """What each worker runs before its first call."""
        return self._settings.given_init

    @property
    def retire(self) -> object:
        """When workers are replaced: a function run after each call, or a number of calls."""
        return self._settings.given_retire

    @property
    def grace_period(self) -> float:
        """Seconds the workers are given to exit when the context ends."""
        return self._settings.grace_period

    @property
    def worker_type(self) -> WorkerType:
        """As given (see :class:`WorkerType`)."""
        return self._settings.worker_type

    async def run_sync(
        self,
        fn: Callable[..., T],
        *args: Any,
        kill_on_cancel: bool = False,
        cancellable: bool = False,
        limiter: AbstractAsyncContextManager[Any] | None = None,
    ) -> T:
        """Run ``fn(*args)`` in a worker of this context (see :func:`run_sync`)."""
        run = this_run()
        await run.checkpoint_if_cancelled()
        return await self._run(run, fn, args, kill_on_cancel or cancellable, limiter)

    def statistics(self) -> WorkerContextStatistics:
        """How many workers are idle and how many are running calls."""
        if self._over is not None:
            return WorkerContextStatistics(*self._over.statistics())
        self._prune()
        return WorkerContextStatistics(len(self._idle), len(self._running))

    async def _run(
        self,
        run: Run,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kill_on_cancel: bool,
        limiter: AbstractAsyncContextManager[Any] | None,
    ) -> T:
        over = self._over
        threshold = self._settings.buffers
        if over is not None and not over.buffers:
            threshold = None
        payload, fds = request_payload(fn, args, threshold)
        # Closed with it, if the call ends before they are sent.
        buffers = Descriptors(fds) if fds else None
        if over is not None:
            over.check_call(fn, args, payload)
        elif b"__main__" in payload and (
            self._main_loaded_in is None or self._main_loaded_in is not self._handle
        ):
            await self._load_main_for(fn, args)
        if limiter is None:
            limiter = run.limiter
        if type(limiter) is run.limiter_type:
            # "async with limiter" without its schedule point when a token is free:
            # the wait for the reply yields anyway.
            capacity: Any = limiter
            try:
                capacity.acquire_nowait()
            except run.would_block:
                await capacity.acquire()
            try:
                return await self._call(run, payload, buffers, kill_on_cancel)  # type: ignore[no-any-return]
            finally:
                capacity.release()
        async with limiter:
            return await self._call(run, payload, buffers, kill_on_cancel)  # type: ignore[no-any-return]

    async def _call(
        self, run: Run, payload: bytes, buffers: Descriptors | None, kill_on_cancel: bool
    ) -> Any:
        """One call, in a worker taken from the idle ones or started for it; its result."""
        if self._closed:
            raise closed_error(run.backend, "this worker context is closed")
        if loading.main or loading.call == threading.get_ident():
            # Code that runs when a module is loaded is running in a template or a
            # worker, which is loading it: going on would start workers without end.
            raise RuntimeError(
                "trio_fork workers were requested while a worker template was loading "
                "this program's main module: put the code that runs the program under "
                "'if __name__ == \"__main__\":'"
                if loading.main
                else "trio_fork workers were requested while a worker was loading the "
                "function or the arguments of a call, whose module starts workers when "
                "it is imported (each worker would import it again): start them from a "
                "function, or under 'if __name__ == \"__main__\":'"
            )
        if self._over is not None:
            return await self._over.call(payload, buffers, kill_on_cancel)
        worker = self._take(_main_key())
        if worker is None:
            if kill_on_cancel:
                worker = await self._start_worker()
            else:
                # Past the limiter, a call that cannot be cancelled has begun.
                started, held = await shielded(self._start_worker)
                if held is not None:
                    self._put_back(started)  # it never ran anything
                    raise held
                worker = started
        self._running.add(worker)
        worker.reusable = False
        try:
            frame = await self._exchange(run, worker, payload, buffers, kill_on_cancel)
        finally:
            self._running.discard(worker)
            if worker.reusable:
                self._put_back(worker)
            else:
                worker.close()
            if not self._running and self._drained is not None:
                self._drained.set()
        if frame.op == RESULT:
            if frame.fds:
                return _buffers.loads(*_buffers.receive(frame.payload, frame.fds))
            return pickle.loads(frame.payload)
        raise unwrap_error(unpack_strings(frame.payload, 3), originals=True)

    async def _exchange(
        self,
        run: Run,
        worker: Worker,
        payload: bytes,
        buffers: Descriptors | None,
        kill_on_cancel: bool,
    ) -> Frame:
        """Send the call and wait for its reply, as :func:`run_sync` promises under
        cancellation; any other interruption kills the worker. Sets ``worker.reusable``."""

        async def finish() -> Frame | BrokenWorkerError:
            try:
                frame = await worker.finish(run.wait_readable, run.wait_writable)
            except WorkerDied:
                return await worker.lost(running=True)
            return _check_reply(worker, frame)

        worker.calls += 1
        try:
            worker.send(payload, () if buffers is None else buffers.take())
            outcome = await finish()
        except run.cancelled:
            if kill_on_cancel:
                worker.kill()
            outcome, held = await shielded(finish)
            lost = isinstance(outcome, BrokenWorkerError)
            worker.reusable = not (kill_on_cancel or lost)
            # A call that completed keeps its reply, and the cancellation takes
            # effect at the next checkpoint; not one delivered once (asyncio's own),
            # which is raised now.
            if lost or held is not None or not cancellation_kept():
                raise
        except BaseException:
            # KeyboardInterrupt and the like: the worker's state is unknown; it goes.
            worker.kill()
            raise
        if isinstance(outcome, BrokenWorkerError):
            raise outcome
        worker.reusable = True
        return outcome

    def _retiring(self, worker: Worker) -> bool:
        calls = self._settings.retire_calls
        return worker.retiring or (calls is not None and worker.calls >= calls)

    def _take(self, main: object) -> Worker | None:
        """An idle worker, most recently used first; None if there is none alive.

        Not one started for another main module: a worker takes on the main module
        that is ours when it starts (the tests of a test suite may change it).
        """
        self._prune()
        idle = self._idle
        while idle:
            try:
                worker = idle.pop()
            except IndexError:  # another thread took the last one
                return None
            if worker.main == main and not worker.exited():
                return worker
            worker.close()
        return None

    def _prune(self) -> None:
        """End the workers idle for longer than ``idle_timeout``."""
        idle = self._idle
        if not idle:
            return
        expired = time.monotonic() - self._settings.idle_timeout
        while idle and idle[0].idle_since <= expired:
            try:
                worker = idle.popleft()
            except IndexError:
                return
            worker.close()

    def _put_back(self, worker: Worker) -> None:
        if self._closed or self._retiring(worker):
            worker.close()
            return
        worker.idle_since = time.monotonic()
        self._idle.append(worker)

    async def _start_worker(self) -> Worker:
        handle = await self._template()
        main = _main_key()
        try:
            worker = await start_worker(handle, self._invoke(handle))
        except BrokenTemplateError:
            # The template died (the OOM killer, say): a new one, once.
            handle = await self._template(replacing=handle)
            worker = await start_worker(handle, self._invoke(handle))
        worker.main = main
        worker.buffers = self._settings.buffers is not None
        return worker

    def _invoke(self, handle: TemplateHandle) -> bytes:
        """The command that makes a fork of ``handle`` a worker of this context, now."""
        setup: Any = _setup_now(None, None)
        if setup == handle._setup:
            setup = None
        authkey = None
        process = sys.modules.get("multiprocessing.process")
        if process is not None:
            authkey = bytes(process.current_process().authkey)
        main = main_location()
        if main != (None, None):
            # As multiprocessing does: what workers pickle from their __mp_main__
            # (which is our __main__) is found here.
            sys.modules.setdefault("__mp_main__", sys.modules["__main__"])
        return invoke_frame(
            pickle.dumps(
                (become_worker, (self._settings.spec(), setup, authkey, main)),
                pickle.HIGHEST_PROTOCOL,
            )
        )

    async def _template(self, replacing: TemplateHandle | None = None) -> TemplateHandle:
        handle = self._handle
        if handle is not None and handle is not replacing and not handle.closed:
            return handle
        return await anyio.to_thread.run_sync(self._start_template, replacing)

    def _start_template(self, replacing: TemplateHandle | None = None) -> TemplateHandle:
        """The context's template, started if there is none (or it died); blocking."""
        with self._lock:
            if self._closed:
                raise anyio.ClosedResourceError("this worker context is closed")
            handle = self._handle
            if handle is not None and handle is not replacing and not handle.closed:
                return handle
            if handle is not None:
                handle.close()  # it died: reap it
            preload = list(self._settings.preload)
            preload.append("trio_fork.worker._apply")
            if "multiprocessing.process" in sys.modules:
                preload.append("multiprocessing.process")
            self._handle = handle = start_template(preload)
            # After the template's own exit handler, so that it runs before it: the
            # workers exit on their own (and flush what they printed) before the
            # template ends them.
            atexit.unregister(self._shutdown_at_exit)
            atexit.register(self._shutdown_at_exit)
        return handle

    async def _load_main_for(self, *objects: object) -> None:
        if refers_to_main(objects):  # rather than "__main__" being only data
            await anyio.to_thread.run_sync(self._load_main)

    def _load_main(self) -> None:
        """Load our main module into the template, once, so that workers have it."""
        handle = self._start_template()
        with self._lock:
            if self._main_loaded_in is handle:
                return
            load_main(handle)
            self._main_loaded_in = handle
        # Forks of the template have it now; the idle workers would each load it.
        while self._idle:
            try:
                self._idle.popleft().close()
            except IndexError:
                break

    async def _aclose(self) -> None:
        """Close: wait for the calls running, then end the workers and the template."""
        self._closed = True
        if self._running:
            self._drained = anyio.Event()
            await self._drained.wait()
        await anyio.to_thread.run_sync(self._shutdown)

    def _retire(self) -> None:
        """No more calls; end what is idle now, and the rest at exit (see _shutdown)."""
        self._closed = True
        if not self._running:
            self._shutdown()
            return
        while self._idle:
            try:
                self._idle.popleft().close()
            except IndexError:
                break

    def _shutdown(self) -> None:
        """End the workers (``grace_period`` seconds to exit), then the template. Blocking."""
        atexit.unregister(self._shutdown_at_exit)
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._running]
            self._idle.clear()
            handle, self._handle = self._handle, None
        for worker in workers:
            worker.end()
        wait_reaped(workers, self._settings.grace_period if handle is not None else 0.0)
        for worker in workers:
            worker.close()
        if handle is not None:
            handle.close()  # kills and reaps what is left below it, and the template

    def _shutdown_at_exit(self) -> None:
        if os.getpid() == self._owner:
            self._shutdown()

    def _forget(self) -> None:
        """In a forked copy of this process: let go of every descriptor, end nothing."""
        self._lock = threading.Lock()
        self._closed = True
        for worker in [*self._idle, *self._running]:
            worker.close()
        self._idle.clear()
        self._running.clear()
        self._handle = None  # the handle forgets itself (see _handle)


def _main_key() -> object:
    """What identifies our main module, cheaply (see WorkerContext._take)."""
    main = sys.modules.get("__main__")
    return id(main), getattr(main, "__file__", None)


def _check_reply(worker: Worker, frame: Frame) -> Frame | BrokenWorkerError:
    if frame.fds_lost or (frame.fds and frame.op != RESULT):
        _wire.close_all(frame.fds)
        worker.kill()
        return BrokenWorkerError(
            f"worker {worker.pid} sent a reply whose descriptors were lost or unexpected "
            "(is RLIMIT_NOFILE too low?); it was killed"
        )
    if frame.op != RESULT:
        try:
            unpack_strings(frame.payload, 3)
        except ProtocolError as exc:
            worker.kill()
            return BrokenWorkerError(
                f"worker {worker.pid} broke the protocol ({exc}) and was killed"
            )
    return frame


# Every context alive, so that a forked copy of this process lets go of their workers.
_contexts: weakref.WeakSet[WorkerContext] = weakref.WeakSet()


def _forget_all_in_child() -> None:
    for context in list(_contexts):
        context._forget()
    _contexts.clear()


os.register_at_fork(after_in_child=_forget_all_in_child)
