"""RPC workers: a child that serves calls to one function over its socket.

A sync function is served one call at a time; an async function's worker runs the
parent's event loop (trio or asyncio, imported only then) and each call in a task of
its own. Every call is answered exactly once: result, error, or ``CANCELLED``.
Outside calls, the worker may send events (id 0) and say it retires (see
:mod:`trio_fork.worker`); once the parent has closed the socket and the calls are
done, the ``done`` hook runs, and the worker exits.
"""

from __future__ import annotations

import _thread
import collections
import os
import pickle
import signal
import socket
import sys

from . import _child, _wire
from ._child import is_async, resolve
from ._wire import CALL, CANCEL, CANCELLED, ERROR, EVENT, RESULT, RETIRING, encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Hook = Callable[..., Any] | None

# Frames held back for a batch before they are sent anyway, so that the other side
# starts on the first ones while this side is still producing the rest.
_BATCH = 32
# Queued outgoing bytes above which an async worker's emit() waits for the parent.
_HIGH_WATER = 1024 * 1024

WorkerSpec = collections.namedtuple(
    "WorkerSpec",
    "function init init_args serializer events exceptions backend retire done",
    defaults=(None, None),
)
"""What an RPC worker is spawned with. ``events``: pass the function an ``emit`` first;
``exceptions``: send what it raised pickled too; ``backend``: the parent's event
loop; ``retire``: called after each call of a sync function, exit when true;
``done``: called when the worker ends, as it was asked to, before it exits."""

# The worker this process is, while it serves: the child-side API's way in.
_current: list[_Worker | None] = [None]


def current() -> _Worker | None:
    """The RPC worker this process is, or None."""
    return _current[0]


def serve(sock: socket.socket, spec: WorkerSpec) -> None:
    """The target of every RPC worker: set up, report ready, serve until end of file."""
    # The parent owns Ctrl+C: it decides whether a call is cancelled or the worker
    # killed, so a terminal's SIGINT to the whole process group must not reach here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function = resolve(spec.function, "function")
        init = None if spec.init is None else resolve(spec.init, "init")
        concurrent = is_async(function)
        done = None if spec.done is None else resolve(spec.done, "done")
        for name, hook in (("init", init), ("done", done)):
            if hook is not None and is_async(hook) and not concurrent:
                raise TypeError(
                    f"{name} {getattr(spec, name)!r} is async, but the function is not: an "
                    f"async {name} needs an async function (whose worker runs an event loop)"
                )
        retire = None if spec.retire is None else resolve(spec.retire, "retire")
        _child.set_title(f"rpc {getattr(function, '__name__', 'worker')}")
    except BaseException as exc:
        _fail(sock, exc)
        return
    worker = _current[0] = (_AsyncWorker if concurrent else _SyncWorker)(sock, function, spec)
    worker.serve(init, retire, done)


async def _call_hook(hook: Hook, args: tuple[Any, ...]) -> None:
    if hook is not None:
        result = hook(*args)
        if is_async(hook):
            await result


def _fail(sock: socket.socket, exc: BaseException) -> None:
    sock.setblocking(True)
    try:
        _wire.send_blocking(sock, encode(_wire.FAILED, 0, _wire.error_payload(exc)))
    except OSError:
        pass


class _Worker:
    """What both kinds of worker do: payloads into calls, outcomes into frames."""

    def __init__(self, sock: socket.socket, function: Callable[..., Any], spec: WorkerSpec):
        self.sock = sock
        self.function = function
        self.spec = spec
        self.serializer = spec.serializer
        self.retiring = False

    def ready(self, concurrent: bool) -> list[_wire.Segment]:
        return encode(_wire.WORKER_READY, 0, _wire.WORKER.pack(os.getpid(), concurrent))

    def begin(self, call_id: int, payload: bytes) -> tuple[Any, ...] | list[_wire.Segment]:
        """A call's arguments (its ``emit`` first if asked), or the frame of its error."""
        try:
            args = self.serializer.loads(payload)
            if type(args) is not tuple:
                if not isinstance(args, list):
                    raise TypeError(f"the arguments arrived as {type(args).__name__}")
                args = tuple(args)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not deserialize the arguments")
        return (_Emitter(self, call_id), *args) if self.spec.events else args

    def result(self, call_id: int, value: Any) -> list[_wire.Segment]:
        try:
            payload = self.serializer.dumps(value)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not serialize the result")
        return encode(RESULT, call_id, payload)

    def error(self, call_id: int, exc: BaseException, context: str = "") -> list[_wire.Segment]:
        name, message, text = _wire.describe(exc)
        fields: tuple[str | bytes, ...] = (name, f"{context}: {message}" if context else message)
        fields += (text,)
        if self.spec.exceptions and not context:
            try:
                fields += (pickle.dumps(exc, pickle.HIGHEST_PROTOCOL),)
            except BaseException:
                pass  # the parent falls back to the description
        return encode(ERROR, call_id, _wire.pack_strings(*fields))

    def finish(self, args: tuple[Any, ...]) -> None:
        if self.spec.events:
            args[0].finished = True

    def emit(self, call_id: int, payload: bytes) -> Any:
        raise NotImplementedError

    def serve(self, init: Hook, retire: Hook, done: Hook) -> None:
        """Run ``init``, serve calls until end of file (or retiring), then run ``done``."""
        raise NotImplementedError

    def retire(self) -> None:
        """Take no calls after the current one; the worker exits then (child-side API)."""
        self.retiring = True

    def send_event(self, event: Any) -> None:
        """Send an event that belongs to no call (child-side API)."""
        self.emit(0, self.serializer.dumps(event))


class _Emitter:
    """``emit`` for a call: ``emit(event)``, or ``await emit(event)`` when async."""

    def __init__(self, worker: _Worker, call_id: int) -> None:
        self.worker = worker
        self.call_id = call_id
        self.finished = False

    def __call__(self, event: Any) -> Any:
        if self.finished:
            raise RuntimeError("emit() was called after its call had finished")
        return self.worker.emit(self.call_id, self.worker.serializer.dumps(event))


class _SyncWorker(_Worker):
    def serve(self, init: Hook, retire: Hook, done: Hook) -> None:
        sock = self.sock
        sock.setblocking(True)
        self.lock = _thread.allocate_lock()  # emit() may come from any thread
        try:
            if init is not None:
                init(*self.spec.init_args)
        except BaseException as exc:
            _fail(sock, exc)
            return
        self.reader = _wire.FrameReader()
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        try:
            self.post(self.ready(False))
            while self.receive():
                if self.queue:
                    reply = self.run(*self.queue.popleft())
                    if self.retiring or (retire is not None and self.should_retire(retire)):
                        # Said before the reply, so that the parent sends nothing
                        # more. Calls queued behind this one never started; the
                        # parent sees the exit and sends them to another worker.
                        self.post([*encode(RETIRING), *reply])
                        break
                    self.post(reply)
        except OSError:
            pass  # the parent is gone
        if done is not None:
            done()

    def post(self, segments: list[_wire.Segment]) -> None:
        with self.lock:
            _wire.send_blocking(self.sock, segments)

    def run(self, call_id: int, payload: bytes) -> list[_wire.Segment]:
        args = self.begin(call_id, payload)
        if isinstance(args, list):
            return args
        try:
            value = self.function(*args)
        except BaseException as exc:
            return self.error(call_id, exc)
        finally:
            self.finish(args)
        return self.result(call_id, value)

    def emit(self, call_id: int, payload: bytes) -> None:
        self.post(encode(EVENT, call_id, payload))

    def should_retire(self, retire: Callable[..., Any]) -> bool:
        try:
            return bool(retire())
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
                for index, (queued_id, _) in enumerate(self.queue):
                    if queued_id == frame.id:
                        del self.queue[index]
                        self.post(encode(CANCELLED, frame.id))
                        break
                # Otherwise it has been answered already: the parent takes that.
        return True


class _AsyncWorker(_Worker):
    """Serves each call in a task of the event loop's own (anyio's task groups cost
    several times more per call); a cancelled call's scope is cancelled."""

    loop: Any
    scope: Any
    cancelled: Any
    event: Any
    checkpoint: Any
    wait_readable: Any
    wait_writable: Any
    start_soon: Any

    def serve(self, init: Hook, retire: Hook, done: Hook) -> None:
        self.running: dict[int, Any] = {}
        self.outbox = _wire.Outbox()
        self.drained: Any = None
        if self.spec.backend == "trio":
            import trio

            self.loop, self.scope, self.cancelled = trio, trio.CancelScope, trio.Cancelled
            self.event, self.checkpoint = trio.Event, trio.lowlevel.checkpoint
            self.wait_readable = trio.lowlevel.wait_readable
            self.wait_writable = trio.lowlevel.wait_writable
            trio.run(self.main, init, done)
        else:
            import asyncio

            import anyio  # its cancel scopes honour the shields of the function's own

            self.loop, self.scope, self.cancelled = (
                asyncio,
                anyio.CancelScope,
                asyncio.CancelledError,
            )
            self.event, self.checkpoint = asyncio.Event, lambda: asyncio.sleep(0)
            self.wait_readable, self.wait_writable = anyio.wait_readable, anyio.wait_writable
            asyncio.run(self.main(init, done))

    async def main(self, init: Hook, done: Hook) -> None:
        self.sock.setblocking(False)
        self.wake_writer = self.event()
        self.writer_busy = False  # what init emits waits for the writer
        try:
            await _call_hook(init, self.spec.init_args)
        except BaseException as exc:
            _fail(self.sock, exc)
            return
        self.send(self.ready(True))
        await self.serve_calls()
        await _call_hook(done, ())

    def retire(self) -> None:
        if not self.retiring:  # the parent closes us once our calls are done
            self.retiring = True
            self.send(encode(RETIRING))

    def send_event(self, event: Any) -> None:
        self.send(encode(EVENT, 0, self.serializer.dumps(event)))

    async def serve_calls(self) -> None:
        if self.loop.__name__ == "trio":
            async with self.loop.open_nursery() as nursery:
                self.start_soon = nursery.start_soon
                nursery.start_soon(self.write)
                await self.read()
                nursery.cancel_scope.cancel()  # the parent is done with us, or gone
            return
        tasks: set[Any] = set()

        def start_soon(function: Callable[..., Any], *args: Any) -> None:
            task = self.loop.create_task(function(*args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        self.start_soon = start_soon
        start_soon(self.write)
        try:
            await self.read()
        finally:
            for task in list(tasks):  # the parent is done with us, or gone
                task.cancel()
            await self.loop.gather(*tasks, return_exceptions=True)

    async def read(self) -> None:
        reader = _wire.FrameReader()
        while True:
            try:
                if reader.receive(self.sock, fds=False) == 0:
                    return
            except BlockingIOError:
                await self.wait_readable(self.sock)
                continue
            except OSError:
                return
            while (frame := reader.next_frame()) is not None:
                if frame.op == CALL:
                    self.running[frame.id] = scope = self.scope()
                    self.start_soon(self.serve_call, frame.id, frame.payload, scope)
                elif frame.op == CANCEL and frame.id in self.running:
                    self.running[frame.id].cancel()
            # Let the calls just started run before reading more.
            await self.checkpoint()

    async def serve_call(self, call_id: int, payload: bytes, scope: Any) -> None:
        frame = None
        with scope:
            if not scope.cancel_called:  # cancelled before it started: never called
                frame = await self.outcome(call_id, payload)
        del self.running[call_id]
        self.send(frame or encode(CANCELLED, call_id), now=not self.running)

    async def outcome(self, call_id: int, payload: bytes) -> list[_wire.Segment]:
        """Run one call; the frame that answers it. Only cancellation escapes."""
        args = self.begin(call_id, payload)
        if isinstance(args, list):
            return args
        try:
            value = await self.function(*args)
        except self.cancelled:
            raise
        except BaseException as exc:
            return self.error(call_id, exc)
        finally:
            self.finish(args)
        return self.result(call_id, value)

    def send(self, segments: list[_wire.Segment], *, now: bool = True) -> None:
        """Queue a frame; send it at once if ``now``, else with the others of this batch.

        When many calls finish together their replies go out in one ``sendmsg``
        after them: one system call (and one wake-up of the parent) per batch.
        """
        self.outbox.put(segments)
        if self.writer_busy:
            if len(self.outbox) >= _BATCH and self.flush():
                self.writer_busy = False
        elif not (now and self.flush()):
            self.writer_busy = True
            self.wake_writer.set()

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

    async def write(self) -> None:
        while True:
            await self.wake_writer.wait()
            self.wake_writer = self.event()
            while not self.flush():
                await self.wait_writable(self.sock)
            self.writer_busy = False

    async def emit(self, call_id: int, payload: bytes) -> None:
        # It waits only when a megabyte of output is queued, so that a fast emitter
        # cannot fill the worker's memory while the parent falls behind.
        self.send(encode(EVENT, call_id, payload), now=False)
        if self.outbox.size > _HIGH_WATER:
            if self.drained is None:
                self.drained = self.event()
            await self.drained.wait()
        else:
            await self.checkpoint()
