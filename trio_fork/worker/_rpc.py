"""RPC workers: a child that serves calls to one function over its socket.

Standard library only. The sync loop serves one call at a time in the main thread.
An async function's worker runs an event loop (the parent's, trio or asyncio,
imported only then: never in a template) and serves every call in a task of its own,
so that calls run concurrently and can be cancelled.

Either way the worker answers every call exactly once: with its result, its error,
or ``CANCELLED`` when the parent asked to cancel it and it was stopped (or dropped
before it started). That is what lets the parent always know the worker's state.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
from collections import deque

from . import _wire
from ._child import is_async, resolve
from ._wire import CALL, CANCEL, CANCELLED, ERROR, EVENT, RESULT, RETIRING, encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .._arguments import Serializer

# Frames held back for a batch before they are sent anyway, so that the other side
# starts on the first ones while this side is still producing the rest.
_BATCH = 32
# Queued outgoing bytes above which an async worker's emit() waits for the parent.
_HIGH_WATER = 1024 * 1024


_FIELDS = (
    *("function", "init", "init_args", "serializer"),
    *("events", "exceptions", "backend", "retire"),
)


class WorkerSpec:
    """What an RPC worker is spawned with: the one message that sets it up."""

    __slots__ = _FIELDS

    def __init__(
        self,
        function: str | Callable[..., Any],
        init: str | Callable[..., Any] | None,
        init_args: tuple[Any, ...],
        serializer: Serializer,
        events: bool,
        exceptions: bool,
        backend: str,
        retire: str | Callable[..., Any] | None = None,
    ) -> None:
        self.function = function
        self.init = init
        self.init_args = init_args
        self.serializer = serializer
        self.events = events
        """Pass the function an ``emit`` callable first."""
        self.exceptions = exceptions
        """Send raised exceptions pickled too, besides their description."""
        self.backend = backend
        """The parent's event loop, for an async function's worker."""
        self.retire = retire
        """Called after each call of a sync function; the worker exits when true."""

    def __reduce__(self) -> tuple[type[WorkerSpec], tuple[Any, ...]]:
        return WorkerSpec, tuple(getattr(self, name) for name in _FIELDS)


def serve(sock: socket.socket, spec: WorkerSpec) -> None:
    """The target of every RPC worker: set up, report ready, serve until end of file."""
    # The parent owns Ctrl+C: it decides whether a call is cancelled or the worker
    # killed, so a terminal's SIGINT to the whole process group must not reach here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function = _resolve(spec.function, "function")
        init = None if spec.init is None else _resolve(spec.init, "init")
        concurrent = is_async(function)
        if init is not None and is_async(init) and not concurrent:
            raise TypeError(
                f"init {spec.init!r} is async, but the function is not: an async init "
                "needs an async function (whose worker runs an event loop)"
            )
        retire = None if spec.retire is None else _resolve(spec.retire, "retire")
    except BaseException as exc:
        _fail(sock, exc)
        return
    if concurrent:
        driver = _TrioWorker if spec.backend == "trio" else _AsyncioWorker
        driver(sock, function, spec).run(init)
    else:
        _SyncWorker(sock, function, spec, retire).main(init)


def _resolve(reference: object, what: str) -> Callable[..., Any]:
    if isinstance(reference, str):
        return resolve(reference, what)
    if not callable(reference):
        raise TypeError(f"{what} {reference!r} is not callable")
    return reference


def _fail(sock: socket.socket, exc: BaseException) -> None:
    sock.setblocking(True)
    try:
        _wire.send_blocking(sock, encode(_wire.FAILED, 0, _wire.error_payload(exc)))
    except OSError:
        pass


def _ready(concurrent: bool) -> list[_wire.Segment]:
    return encode(_wire.WORKER_READY, 0, _wire.WORKER.pack(os.getpid(), concurrent))


class _Calls:
    """What every worker does: turning payloads into calls, and outcomes into frames."""

    def __init__(self, sock: socket.socket, function: Callable[..., Any], spec: WorkerSpec):
        self.sock = sock
        self.function = function
        self.serializer = spec.serializer
        self.events = spec.events
        self.exceptions = spec.exceptions
        self.init_args = spec.init_args

    def arguments(self, payload: bytes) -> tuple[Any, ...]:
        args = self.serializer.loads(payload)
        if type(args) is tuple:
            return args
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"the arguments arrived as {type(args).__name__}, not a sequence")
        return tuple(args)

    def result(self, call_id: int, value: Any) -> list[_wire.Segment]:
        try:
            payload = self.serializer.dumps(value)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not serialize the result")
        return encode(RESULT, call_id, payload)

    def error(self, call_id: int, exc: BaseException, context: str = "") -> list[_wire.Segment]:
        name, message, text = _wire.describe(exc)
        original = b""
        if context:
            message = f"{context}: {message}"
        elif self.exceptions:
            try:
                original = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
            except BaseException:
                pass  # the parent falls back to the description
        fields = (name, message, text, original) if original else (name, message, text)
        return encode(ERROR, call_id, _wire.pack_strings(*fields))


class _SyncWorker(_Calls):
    def __init__(
        self,
        sock: socket.socket,
        function: Callable[..., Any],
        spec: WorkerSpec,
        retire: Callable[..., Any] | None,
    ) -> None:
        super().__init__(sock, function, spec)
        self.reader = _wire.FrameReader()
        self.queue: deque[tuple[int, bytes]] = deque()
        self.retire = retire

    def main(self, init: Callable[..., Any] | None) -> None:
        sock = self.sock
        sock.setblocking(True)
        try:
            if init is not None:
                init(*self.init_args)
        except BaseException as exc:
            _fail(sock, exc)
            return
        try:
            _wire.send_blocking(sock, _ready(False))
            while self.receive():
                if self.queue:
                    call_id, payload = self.queue.popleft()
                    reply = self.run(call_id, payload)
                    if self.retire is not None and self.should_retire():
                        # Said before the reply, so that the parent sends nothing
                        # more. Calls queued behind this one never started; the
                        # parent sees the exit and sends them to another worker.
                        _wire.send_blocking(sock, [*encode(RETIRING), *reply])
                        return
                    _wire.send_blocking(sock, reply)
        except OSError:
            pass  # the parent is gone

    def should_retire(self) -> bool:
        assert self.retire is not None
        try:
            return bool(self.retire())
        except BaseException:
            sys.excepthook(*sys.exc_info())
            return True

    def receive(self) -> bool:
        """Take in what has arrived (waiting if there is nothing to do); False at EOF."""
        # With calls queued, only look: cancellations of queued calls must be seen
        # before those calls start, but a running worker must not wait for input.
        flags = socket.MSG_DONTWAIT if self.queue else 0
        try:
            if self.reader.receive(self.sock, flags, fds=False) == 0:
                return False
        except BlockingIOError:
            return True
        while (frame := self.reader.next_frame()) is not None:
            if frame.op == CALL:
                self.queue.append((frame.id, frame.payload))
            elif frame.op == CANCEL:
                self.drop(frame.id)
        return True

    def drop(self, call_id: int) -> None:
        for index, (queued_id, _) in enumerate(self.queue):
            if queued_id == call_id:
                del self.queue[index]
                _wire.send_blocking(self.sock, encode(CANCELLED, call_id))
                return
        # Otherwise it has been answered already: the parent takes that answer.

    def run(self, call_id: int, payload: bytes) -> list[_wire.Segment]:
        try:
            args = self.arguments(payload)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not deserialize the arguments")
        emit = None
        if self.events:
            emit = _SyncEmitter(self, call_id)
            args = (emit, *args)
        try:
            value = self.function(*args)
        except BaseException as exc:
            return self.error(call_id, exc)
        finally:
            if emit is not None:
                emit.finished = True
        return self.result(call_id, value)


class _SyncEmitter:
    """``emit`` for a sync worker's call: sends an event, blocking until it is sent."""

    def __init__(self, worker: _SyncWorker, call_id: int) -> None:
        self.worker = worker
        self.call_id = call_id
        self.finished = False

    def __call__(self, event: Any) -> None:
        if self.finished:
            raise RuntimeError("emit() was called after its call had finished")
        payload = self.worker.serializer.dumps(event)
        _wire.send_blocking(self.worker.sock, encode(EVENT, self.call_id, payload))


class _AsyncWorker(_Calls):
    """What the two event-loop drivers share: running calls and queueing replies.

    The drivers use their event loop directly rather than through anyio: a worker
    starts a task per call, and anyio's task groups cost several times what the
    loops' own tasks do. The user's function still runs on the parent's backend, so
    it may use anyio, or that backend, as it likes.
    """

    cancelled_class: type[BaseException]

    def __init__(self, sock: socket.socket, function: Callable[..., Any], spec: WorkerSpec):
        super().__init__(sock, function, spec)
        self.running: dict[int, Any] = {}
        self.outbox = _wire.Outbox()
        self.writer_busy = False
        self.drained: Any = None

    def run(self, init: Callable[..., Any] | None) -> None:
        raise NotImplementedError

    async def start(self, init: Callable[..., Any] | None) -> bool:
        """Run ``init`` and report ready; False if the worker cannot serve."""
        try:
            if init is not None:
                if is_async(init):
                    await init(*self.init_args)
                else:
                    init(*self.init_args)
        except BaseException as exc:
            _fail(self.sock, exc)
            return False
        self.sock.setblocking(False)
        self.send(_ready(True))
        return True

    async def outcome(self, call_id: int, payload: bytes) -> list[_wire.Segment]:
        """Run one call; the frame that answers it. Only cancellation escapes."""
        try:
            args = self.arguments(payload)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not deserialize the arguments")
        emit = None
        if self.events:
            emit = _AsyncEmitter(self, call_id)
            args = (emit, *args)
        try:
            value = await self.function(*args)
        except self.cancelled_class:
            raise
        except BaseException as exc:
            return self.error(call_id, exc)
        finally:
            if emit is not None:
                emit.finished = True
        return self.result(call_id, value)

    def answer(self, call_id: int, frame: list[_wire.Segment] | None) -> None:
        """Send a call's answer (None: it was cancelled) and forget the call."""
        del self.running[call_id]
        self.send(frame if frame is not None else encode(CANCELLED, call_id), now=not self.running)

    def handle(self, frame: _wire.Frame) -> None:
        """A frame from the parent: start a call, or cancel one."""
        if frame.op == CALL:
            self.start_call(frame.id, frame.payload)
        elif frame.op == CANCEL and frame.id in self.running:
            self.cancel_call(frame.id)

    def start_call(self, call_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def cancel_call(self, call_id: int) -> None:
        raise NotImplementedError

    def send(self, segments: list[_wire.Segment], *, now: bool = True) -> None:
        """Queue a frame; send it at once if ``now``, else with the others of this batch.

        A reply goes out at once when it is the worker's only one; when many calls
        finish together, their replies go out in one ``sendmsg`` after them: one
        system call (and one wake-up of the parent) per batch instead of per reply.
        """
        self.outbox.put(segments)
        if self.writer_busy:
            if len(self.outbox) >= _BATCH and self.flush():
                self.writer_busy = False
            return
        if now and self.flush():
            return
        self.writer_busy = True
        self.flush_later()

    def flush(self) -> bool:
        """Send what the socket takes; whether the queue is now empty."""
        try:
            if not self.outbox.flush(self.sock):
                return False
        except OSError:
            self.outbox.clear()  # the parent is gone; the reader sees end of file next
        if self.drained is not None:
            self.drained.set()
            self.drained = None
        return True

    def flush_later(self) -> None:
        """Make sure the queue is flushed once the calls now running have had a turn."""
        raise NotImplementedError

    async def wait_drained(self) -> None:
        raise NotImplementedError

    async def checkpoint(self) -> None:
        raise NotImplementedError


class _TrioWorker(_AsyncWorker):
    def __init__(self, sock: socket.socket, function: Callable[..., Any], spec: WorkerSpec):
        super().__init__(sock, function, spec)
        import trio

        self.trio = trio
        self.cancelled_class = trio.Cancelled
        self.wake_writer = trio.Event()

    def run(self, init: Callable[..., Any] | None) -> None:
        self.trio.run(self.main, init)

    async def main(self, init: Callable[..., Any] | None) -> None:
        if not await self.start(init):
            return
        async with self.trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.write)
            await self.read()
            # End of file: the parent is done with us (or gone). Calls still running
            # have nobody to answer to.
            nursery.cancel_scope.cancel()

    async def read(self) -> None:
        trio = self.trio
        reader = _wire.FrameReader()
        while True:
            try:
                if reader.receive(self.sock, fds=False) == 0:
                    return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError:
                return
            while (frame := reader.next_frame()) is not None:
                self.handle(frame)
            # Let the calls just started run before reading more.
            await trio.lowlevel.checkpoint()

    def start_call(self, call_id: int, payload: bytes) -> None:
        scope = self.running[call_id] = self.trio.CancelScope()
        self.nursery.start_soon(self.serve_call, call_id, payload, scope)

    def cancel_call(self, call_id: int) -> None:
        self.running[call_id].cancel()

    async def serve_call(self, call_id: int, payload: bytes, scope: Any) -> None:
        frame = None
        with scope:
            if not scope.cancel_called:
                frame = await self.outcome(call_id, payload)
        self.answer(call_id, frame)

    def flush_later(self) -> None:
        self.wake_writer.set()

    async def write(self) -> None:
        trio = self.trio
        while True:
            await self.wake_writer.wait()
            self.wake_writer = trio.Event()
            while not self.flush():
                await trio.lowlevel.wait_writable(self.sock)
            self.writer_busy = False

    async def wait_drained(self) -> None:
        if self.drained is None:
            self.drained = self.trio.Event()
        await self.drained.wait()

    async def checkpoint(self) -> None:
        await self.trio.lowlevel.checkpoint()


class _AsyncioWorker(_AsyncWorker):
    """Reads in a reader callback, runs each call in an asyncio task of its own.

    A call is cancelled through an anyio cancel scope, not ``Task.cancel()``: anyio
    honours the shields of the function's own cancel scopes only for cancellations
    it delivers itself.
    """

    def __init__(self, sock: socket.socket, function: Callable[..., Any], spec: WorkerSpec):
        super().__init__(sock, function, spec)
        import asyncio

        import anyio

        self.asyncio = asyncio
        self.anyio = anyio
        self.cancelled_class = asyncio.CancelledError
        self.reader = _wire.FrameReader()
        self.tasks: set[Any] = set()
        self.cancelled_early: set[int] = set()

    def run(self, init: Callable[..., Any] | None) -> None:
        self.asyncio.run(self.main(init))

    async def main(self, init: Callable[..., Any] | None) -> None:
        asyncio = self.asyncio
        self.loop = loop = asyncio.get_running_loop()
        if not await self.start(init):
            return
        self.end_of_file = loop.create_future()
        loop.add_reader(self.sock, self.on_readable)
        try:
            await self.end_of_file
        finally:
            # The parent is done with us (or gone). Calls still running have nobody
            # to answer to.
            loop.remove_reader(self.sock)
            loop.remove_writer(self.sock)
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def on_readable(self) -> None:
        try:
            received = self.reader.receive(self.sock, fds=False)
        except BlockingIOError:
            return
        except OSError:
            received = 0
        if not received:
            self.loop.remove_reader(self.sock)
            if not self.end_of_file.done():
                self.end_of_file.set_result(None)
            return
        while (frame := self.reader.next_frame()) is not None:
            self.handle(frame)

    def start_call(self, call_id: int, payload: bytes) -> None:
        self.running[call_id] = None
        task = self.loop.create_task(self.serve_call(call_id, payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_call(self, call_id: int) -> None:
        scope = self.running[call_id]
        if scope is None:
            self.cancelled_early.add(call_id)
        else:
            scope.cancel()

    async def serve_call(self, call_id: int, payload: bytes) -> None:
        frame = None
        if call_id in self.cancelled_early:
            self.cancelled_early.discard(call_id)
        else:
            with self.anyio.CancelScope() as scope:
                self.running[call_id] = scope
                frame = await self.outcome(call_id, payload)
        self.answer(call_id, frame)

    def flush_later(self) -> None:
        self.loop.call_soon(self.flush_or_wait)

    def flush_or_wait(self) -> None:
        if self.flush():
            self.writer_busy = False
            self.loop.remove_writer(self.sock)
        else:
            self.loop.add_writer(self.sock, self.flush_or_wait)

    async def wait_drained(self) -> None:
        if self.drained is None:
            self.drained = self.asyncio.Event()
        await self.drained.wait()

    async def checkpoint(self) -> None:
        await self.asyncio.sleep(0)


class _AsyncEmitter:
    """``emit`` for an async worker's call: ``await emit(event)`` sends an event.

    It waits only when a megabyte of output is queued, so that a fast emitter cannot
    fill the worker's memory while the parent falls behind.
    """

    def __init__(self, worker: _AsyncWorker, call_id: int) -> None:
        self.worker = worker
        self.call_id = call_id
        self.finished = False

    async def __call__(self, event: Any) -> None:
        if self.finished:
            raise RuntimeError("emit() was called after its call had finished")
        worker = self.worker
        worker.send(encode(EVENT, self.call_id, worker.serializer.dumps(event)), now=False)
        if worker.outbox.size > _HIGH_WATER:
            await worker.wait_drained()
        else:
            await worker.checkpoint()
