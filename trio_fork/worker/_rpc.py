"""RPC workers: a child that serves calls to one function over its socket.

A sync function is served one call at a time on a blocking socket; an async
function's worker runs the parent's event loop (trio or asyncio, imported only
then) and each call in a task of its own. Both run the same code
(:meth:`Worker.main`, :meth:`Worker.outcome`), which a sync worker drives as a
coroutine that never suspends. Every call is answered exactly once: result, error,
or ``CANCELLED``. Outside calls, the worker may send events (id 0) and say it
retires (see :mod:`trio_fork.worker`); once the parent has closed the socket and the
calls are done, the ``done`` hook runs, and the worker exits.
"""

from __future__ import annotations

import _thread
import collections
import functools
import os
import pickle
import signal
import socket
import sys
from types import SimpleNamespace

from . import _buffers, _child, _wire
from ._child import is_async, resolve
from ._serializers import PickleSerializer
from ._wire import CALL, CANCEL, CANCELLED, EVENT, RETIRING, encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence
    from typing import Any, ClassVar

    Call = tuple[int, Any, Sequence[memoryview]]  # id, payload, its buffers

# Frames held back for a batch before they are sent anyway, so that the other side
# starts on the first ones while this side is still producing the rest.
_BATCH = 32
# Queued outgoing bytes above which an async worker's emit() waits for the parent.
_HIGH_WATER = 1024 * 1024

WorkerSpec = collections.namedtuple(
    "WorkerSpec",
    "function init init_args serializer events exceptions backend retire done buffers",
    defaults=(None, None, None),
)
"""What an RPC worker is spawned with. ``events``: pass the function an ``emit`` first;
``exceptions``: send what it raised pickled too; ``backend``: the parent's event
loop; ``retire``: called after each call of a sync function, exit when true;
``done``: called when the worker ends, as it was asked to, before it exits;
``buffers``: the threshold of out-of-band buffers (see ``_buffers``), None for none."""


# What this process is loading, during which starting workers would start them
# without end (the code that does it would run again in each): ``main``, the
# parent's main module (see _apply.adopt_main); ``call``, the thread that loads a
# call's function or arguments, whose unpickling may import their modules (0: none).
loading = SimpleNamespace(main=False, call=0)


def serve(sock: socket.socket, spec: WorkerSpec) -> None:
    """The target of every RPC worker: set up, report ready, serve until end of file."""
    # The parent owns Ctrl+C: it decides whether a call is cancelled or the worker
    # killed, so a terminal's SIGINT to the whole process group must not reach here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function = resolve(spec.function, "function")
        concurrent = is_async(function)
        hooks = {}
        for name in ("init", "retire", "done"):
            hook = getattr(spec, name)
            hook = hooks[name] = None if hook is None else resolve(hook, name)
            if name != "retire" and is_async(hook) and not concurrent:
                raise TypeError(
                    f"{name} {getattr(spec, name)!r} is async, but the function is not: an "
                    f"async {name} needs an async function (whose worker runs an event loop)"
                )
        _child.set_title(f"rpc {getattr(function, '__name__', 'worker')}")
    except BaseException as exc:
        _wire.report(sock, _wire.FAILED, exc)
        return
    worker = Worker.current = (_AsyncWorker if concurrent else _SyncWorker)(sock, function, spec)
    worker.hooks = hooks
    worker.serve()


async def _call_hook(hook: Callable[..., Any] | None, args: tuple[Any, ...]) -> None:
    if hook is not None:
        result = hook(*args)
        if is_async(hook):
            await result


class Worker:
    """What both kinds of worker do: frames into calls, outcomes into frames."""

    current: ClassVar[Worker | None] = None  # this process's: the child-side API's way in
    concurrent = False
    cancelled: Any = ()  # what a cancelled call raises: nothing, in a sync worker
    hooks: dict[str, Callable[..., Any] | None]  # init, retire and done, resolved
    # What each kind of worker does its own way:
    serve: Callable[[], None]
    serve_calls: Callable[[], Coroutine[Any, Any, None]]
    send: Callable[..., None]  # (segments, *, now=True): now, or with a batch
    start: Callable[[int, Any, Sequence[memoryview]], None]  # a call: id, payload, buffers
    cancel: Callable[[int], None]

    def __init__(self, sock: socket.socket, function: Callable[..., Any], spec: WorkerSpec):
        self.sock = sock
        self.function = function
        self.spec = spec
        self.serializer = spec.serializer
        self.buffers = spec.buffers  # frames carry descriptors only when this is set
        self.events = spec.events
        self.pickles = bool(spec.buffers) and isinstance(spec.serializer, PickleSerializer)
        self.thread = _thread.get_ident()  # the one that serves calls
        self.reader = _wire.FrameReader()
        # Results sent out of band, freed once their reply is sent: after the caller
        # has it, not on its way.
        self.kept: list[Any] = []
        self.retiring = False

    async def main(self) -> None:
        """Run ``init``, serve calls until end of file (or retiring), then run ``done``."""
        try:
            await _call_hook(self.hooks["init"], self.spec.init_args)
        except BaseException as exc:
            _wire.report(self.sock, _wire.FAILED, exc)
            return
        try:
            self.send(
                encode(_wire.WORKER_READY, 0, _wire.WORKER.pack(os.getpid(), self.concurrent))
            )
            await self.serve_calls()
        except OSError:
            pass  # the parent is gone
        await _call_hook(self.hooks["done"], ())

    def take_in(self, flags: int = 0) -> bool:
        """Receive once and start or cancel the calls that came; False at end of file.

        Raises :exc:`BlockingIOError` if nothing came.
        """
        if self.reader.receive(self.sock, flags, fds=bool(self.buffers)) == 0:
            return False
        while (frame := self.reader.next_frame()) is not None:
            if frame.op == CALL:
                if not (frame.fds or frame.fds_lost):
                    self.start(frame.id, frame.payload, ())
                    continue
                try:
                    if frame.fds_lost:  # or sent with buffers off: the kernel dropped them
                        raise OSError(
                            "descriptors were lost in transit (is RLIMIT_NOFILE too low?)"
                        )
                    self.start(frame.id, *_buffers.receive(frame.payload, frame.fds))
                except (OSError, ValueError) as exc:
                    self.send(
                        self.error(frame.id, exc, "the worker could not receive the arguments")
                    )
            elif frame.op == CANCEL:
                self.cancel(frame.id)
        return True

    async def outcome(
        self, call_id: int, payload: Any, buffers: Sequence[memoryview]
    ) -> list[_wire.Segment]:
        """Run one call; the frame that answers it. Only cancellation escapes."""
        try:
            loading.call = self.thread
            args = _buffers.loads(payload, buffers) if buffers else self.serializer.loads(payload)
            if type(args) is not tuple:
                if not isinstance(args, list):
                    raise TypeError(f"the arguments arrived as {type(args).__name__}")
                args = tuple(args)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not deserialize the arguments")
        finally:
            loading.call = 0
        events = self.events
        if events:
            args = (_Emitter(self, call_id), *args)
        try:
            value = self.function(*args)
            if self.concurrent:
                value = await value
        except self.cancelled:
            raise
        except BaseException as exc:
            return self.error(call_id, exc)
        finally:
            if events:
                args[0].finished = True
        try:
            payload, fds = self.dump(value)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not serialize the result")
        if fds:
            self.kept.append(value)
        return encode(_wire.RESULT, call_id, payload, fds)

    def dump(self, value: Any) -> tuple[bytes, Sequence[int]]:
        """``value`` serialized, and the descriptors of its out-of-band buffers."""
        kind = type(value)
        if kind is _buffers.Dumped:  # pickled already, by run_sync's apply
            return value[0], value[1]
        if self.pickles and kind not in _buffers.PLAIN:  # may hold big buffers
            return _buffers.dumps(value, self.buffers)
        return self.serializer.dumps(value), ()

    def error(self, call_id: int, exc: BaseException, context: str = "") -> list[_wire.Segment]:
        name, message, text = _wire.describe(exc)
        fields: tuple[str | bytes, ...] = (
            name,
            f"{context}: {message}" if context else message,
            text,
        )
        if self.spec.exceptions and not context:
            try:
                fields += (pickle.dumps(exc, pickle.HIGHEST_PROTOCOL),)
            except BaseException:
                pass  # the parent falls back to the description
        return encode(_wire.ERROR, call_id, _wire.pack_strings(*fields))

    def emit(self, call_id: int, payload: bytes, fds: Sequence[int]) -> Any:
        self.send(encode(EVENT, call_id, payload, fds))

    def send_event(self, event: Any) -> None:
        """Send an event that belongs to no call (child-side API)."""
        self.send(encode(EVENT, 0, *self.dump(event)))

    def retire(self) -> None:
        """Take no calls after the current one; the worker exits then (child-side API)."""
        self.retiring = True


class _Emitter:
    """``emit`` for a call: ``emit(event)``, or ``await emit(event)`` when async."""

    def __init__(self, worker: Worker, call_id: int) -> None:
        self.worker = worker
        self.call_id = call_id
        self.finished = False

    def __call__(self, event: Any) -> Any:
        if self.finished:
            raise RuntimeError("emit() was called after its call had finished")
        return self.worker.emit(self.call_id, *self.worker.dump(event))


_CANCELLED = object()  # in _AsyncWorker.running: a call cancelled before it started


def _drive(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends (a sync worker's ``main``) to its end."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise AssertionError("a sync worker's coroutine suspended")


class _SyncWorker(Worker):
    def serve(self) -> None:
        self.sock.setblocking(True)
        self.lock = _thread.allocate_lock()  # emit() may come from any thread
        self.queue: collections.deque[Call] = collections.deque()
        _drive(self.main())

    async def serve_calls(self) -> None:
        while self.receive():
            if self.queue:
                call = self.queue.popleft()
                reply = await self.outcome(*call)
                # Its buffers let go of before the answer: a sender that reuses its
                # memfds finds this call's free when the answer comes (_buffers._Pool).
                del call
                if self.retiring or self.should_retire():
                    # Said before the reply, so that the parent sends nothing more.
                    # Calls queued behind this one never started; the parent sees
                    # the exit and sends them to another worker.
                    self.send([*encode(RETIRING), *reply])
                    return
                self.send(reply)
                del reply
                self.kept.clear()

    def receive(self) -> bool:
        """Take in what has arrived (waiting if there is nothing to do); False at EOF."""
        # With calls queued, only look: cancellations of queued calls must be seen
        # before those calls start, but a running worker must not wait for input.
        try:
            return self.take_in(socket.MSG_DONTWAIT if self.queue else 0)
        except BlockingIOError:
            return True

    def start(self, call_id: int, payload: Any, buffers: Sequence[memoryview]) -> None:
        self.queue.append((call_id, payload, buffers))

    def cancel(self, call_id: int) -> None:
        for index, (queued_id, _, _) in enumerate(self.queue):
            if queued_id == call_id:
                del self.queue[index]
                self.send(encode(CANCELLED, call_id))
                return
        # Otherwise it has been answered already: the parent takes that.

    def send(self, segments: list[_wire.Segment], *, now: bool = True) -> None:
        with self.lock:
            _wire.send_blocking(self.sock, segments)

    def should_retire(self) -> bool:
        try:
            return self.hooks["retire"] is not None and bool(self.hooks["retire"]())
        except BaseException:
            sys.excepthook(*sys.exc_info())
            return True


class _AsyncWorker(Worker):
    """Serves each call in a task of its own; a cancelled call's scope is cancelled.

    On the event loop's own primitives: with anyio's task groups and cancel scopes,
    15 to 40% fewer calls per second (256 in flight, see docs/design.md), and on trio
    anyio is not even imported. anyio's cancel scopes, on asyncio, honour the shields
    of the function's own.
    """

    concurrent = True
    # The event loop's primitives, chosen in serve():
    start_soon: Callable[..., Any]
    scope: Any
    event: Any
    checkpoint: Any
    wait_readable: Any
    wait_writable: Any

    def serve(self) -> None:
        self.sock.setblocking(False)
        self.running: dict[int, Any] = {}
        self.outbox = _wire.Outbox()
        self.drained: Any = None
        self.writer_busy = False  # what init emits waits for the writer
        if self.spec.backend == "trio":
            import trio
            from trio.lowlevel import checkpoint, wait_readable, wait_writable

            self.scope, self.event, self.cancelled = trio.CancelScope, trio.Event, trio.Cancelled
            self.checkpoint, self.wait_readable, self.wait_writable = (
                checkpoint,
                wait_readable,
                wait_writable,
            )
            trio.run(self.main)
        else:
            import asyncio

            import anyio

            self.scope, self.event = anyio.CancelScope, asyncio.Event
            self.cancelled = asyncio.CancelledError
            self.checkpoint = functools.partial(asyncio.sleep, 0)
            self.wait_readable, self.wait_writable = anyio.wait_readable, anyio.wait_writable
            try:
                import sniffio
            except ImportError:  # anyio does without it
                pass
            else:
                # Said, as anyio.run says it: else anyio sniffs for every cancel scope,
                # 0.4 us of a call's 10 (worker CPU a call 10.0 -> 9.2 us, 256 in flight).
                sniffio.current_async_library_cvar.set("asyncio")
            asyncio.run(self.main())

    async def main(self) -> None:
        self.wake_writer = self.event()
        await super().main()

    async def serve_calls(self) -> None:
        if self.spec.backend == "trio":
            import trio

            async with trio.open_nursery() as nursery:
                self.start_soon = nursery.start_soon
                nursery.start_soon(self.write)
                await self.read()
                nursery.cancel_scope.cancel()  # the parent is done with us, or gone
            return
        import asyncio

        tasks: set[Any] = set()
        create_task = asyncio.get_running_loop().create_task

        def start_soon(function: Callable[..., Any], *args: Any) -> None:
            task = create_task(function(*args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        self.start_soon = start_soon
        start_soon(self.write)
        try:
            await self.read()
        finally:
            for task in list(tasks):  # the parent is done with us, or gone
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def read(self) -> None:
        while True:
            try:
                if not self.take_in():
                    return
            except BlockingIOError:
                pass
            except OSError:
                return
            # Waiting lets the calls just started run first; more calls came meanwhile,
            # or come later: a checkpoint and then an empty read cost more.
            await self.wait_readable(self.sock)

    def start(self, call_id: int, payload: Any, buffers: Sequence[memoryview]) -> None:
        # Its cancel scope is made in its task: anyio's, on asyncio, needs one (and
        # asking trio's whether it was cancelled costs more than this).
        self.running[call_id] = None
        self.start_soon(self.serve_call, call_id, payload, buffers)

    def cancel(self, call_id: int) -> None:
        scope = self.running.get(call_id, _CANCELLED)
        if scope is None:  # not started yet: never will be
            self.running[call_id] = _CANCELLED
        elif scope is not _CANCELLED:
            scope.cancel()

    async def serve_call(self, call_id: int, payload: Any, buffers: Sequence[memoryview]) -> None:
        frame = None
        if self.running[call_id] is None:  # else cancelled before it started: never called
            with self.scope() as self.running[call_id]:
                frame = await self.outcome(call_id, payload, buffers)
        del self.running[call_id], payload, buffers  # let go of before the answer, as above
        self.send(frame or encode(CANCELLED, call_id), now=not self.running)

    def retire(self) -> None:
        if not self.retiring:  # the parent closes us once our calls are done
            self.retiring = True
            self.send(encode(RETIRING))

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
        self.kept.clear()
        return True

    async def write(self) -> None:
        while True:
            await self.wake_writer.wait()
            self.wake_writer = self.event()
            while not self.flush():
                await self.wait_writable(self.sock)
            self.writer_busy = False

    async def emit(self, call_id: int, payload: bytes, fds: Sequence[int]) -> None:
        # It waits only when a megabyte of output is queued, so that a fast emitter
        # cannot fill the worker's memory while the parent falls behind.
        self.send(encode(EVENT, call_id, payload, fds), now=False)
        if self.outbox.size > _HIGH_WATER:
            if self.drained is None:
                self.drained = self.event()
            await self.drained.wait()
        else:
            await self.checkpoint()
