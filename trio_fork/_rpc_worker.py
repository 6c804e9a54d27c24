"""The worker side of RPC: a child that serves calls to one function over its socket.

Standard library only, so that templates can load it without anything heavy. The
sync backend serves one call at a time in the main thread. The async backend runs an
event loop (the parent's, trio or asyncio, imported only then: never in a template)
and serves every call in a task of its own, so that calls run concurrently and can be
cancelled.

Either way the worker answers every call exactly once: with its result, its error,
or ``CANCELLED`` when the parent asked to cancel it and it was stopped (or dropped
before it started). That is what lets the parent always know the worker's state.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import signal
import socket
import sys
import types
from collections import deque
from collections.abc import Callable
from typing import Any

from trio_fork._rpc_wire import (
    CALL,
    CANCEL,
    CANCELLED,
    ERROR,
    EVENT,
    FAILED,
    READY,
    RESULT,
    RETIRING,
    FrameDecoder,
    describe,
    encode,
    send_blocking,
)
from trio_fork._serve import is_async, resolve

# The most buffers handed to one sendmsg (the kernel's limit is 1024).
_MAX_BUFFERS = 512
# Frames held back for a batch before they are sent anyway, so that the other side
# starts on the first ones while this side is still producing the rest.
_BATCH = 32
# Queued outgoing bytes above which an async worker's emit() waits for the parent.
_HIGH_WATER = 1024 * 1024


def serve(sock: socket.socket, pickled_options: bytes) -> None:
    """The target of every RPC worker: set up, report ready, serve until end of file.

    The options hold ``function``, ``init``, ``init_args``, ``serializer``,
    ``events`` (pass an ``emit`` function first), ``exceptions`` (send raised
    exceptions pickled, besides their description), ``backend`` (the parent's
    event loop, for an async function) and, for a sync function, ``retire`` (called
    after each call; the worker exits when it returns true).
    """
    # The parent owns Ctrl+C: it decides whether a call is cancelled or the worker
    # killed, so a terminal's SIGINT to the whole process group must not reach here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        options = _Unpickler(io.BytesIO(pickled_options)).load()
        function = _resolve(options["function"], "function")
        init = None if options["init"] is None else _resolve(options["init"], "init")
        concurrent = is_async(function)
        if init is not None and is_async(init) and not concurrent:
            raise TypeError(
                f"init {options['init']!r} is async, but the function is not: an async "
                "init needs an async function (whose worker runs an event loop)"
            )
    except BaseException as exc:
        _fail(sock, exc)
        return
    if concurrent:
        driver = _TrioWorker if options["backend"] == "trio" else _AsyncioWorker
        driver(sock, function, options).run(init, options["init_args"])
    else:
        _SyncWorker(sock, function, options).main(init, options["init_args"])


# Functions that came pickled with calls, by their pickle: a worker that is called
# with the same function again and again finds it once.
_functions: dict[bytes, Callable[..., Any]] = {}
_MAX_FUNCTIONS = 256


def apply(function: bytes, *args: Any) -> Any:
    """The function of ``run_sync`` workers: call the function that came with the call.

    It comes pickled on its own (the parent pickles each function once), and is
    unpickled once per worker.
    """
    found = _functions.get(function)
    if found is None:
        try:
            found = pickle.loads(function)
        except Exception as exc:
            raise RuntimeError(
                f"the worker could not load the function to call: {type(exc).__name__}: {exc}"
            ) from exc
        if len(_functions) >= _MAX_FUNCTIONS:
            _functions.clear()
        _functions[function] = found
    return found(*args)


LOADING_MAIN = False
"""True in a template while it loads the parent's main module (see ``adopt_main``)."""


def adopt_main(spec_name: str | None, path: str | None) -> None:
    """Load the parent's main module here as ``__mp_main__`` and make it ``__main__``.

    This is what :mod:`multiprocessing` does in its forkserver: functions and classes
    defined in the parent's ``__main__`` are pickled by reference to ``__main__``, and
    now resolve here, in the template, and in every worker forked from it. The
    module's own ``if __name__ == "__main__":`` block does not run.
    """
    if spec_name is not None:
        import importlib.util

        spec = importlib.util.find_spec(spec_name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            raise ImportError(f"cannot find the main module {spec_name!r}")
        code = spec.loader.get_code(spec_name)
        if code is None:
            raise ImportError(f"the main module {spec_name!r} has no code")
        filename = spec.origin
    else:
        assert path is not None
        with open(path, "rb") as file:
            code = compile(file.read(), path, "exec")
        filename = path
    module = types.ModuleType("__mp_main__")
    module.__file__ = filename
    previous = sys.modules["__main__"]
    # Registered before running, so that the module can refer to itself while it
    # loads (dataclasses look their module up in sys.modules, for instance).
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    global LOADING_MAIN
    LOADING_MAIN = True
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules["__main__"] = previous
        del sys.modules["__mp_main__"]
        raise
    finally:
        LOADING_MAIN = False


class _Unpickler(pickle.Unpickler):
    """Finds classes and functions in modules already loaded, without importing more.

    :mod:`pickle` looks names up with ``__import__``, which imports a module's
    top-level package even when the module itself is loaded. This worker's own
    modules are loaded without their package (which would bring trio and anyio
    into every worker), so they are taken from :data:`sys.modules` directly.
    """

    def find_class(self, module_name: str, name: str) -> Any:
        module = sys.modules.get(module_name)
        if module is None:
            return super().find_class(module_name, name)
        obj: Any = module
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


def _resolve(reference: object, what: str) -> Callable[..., Any]:
    if isinstance(reference, str):
        return resolve(reference, what)
    if not callable(reference):
        raise TypeError(f"{what} {reference!r} is not callable")
    return reference


def _fail(sock: socket.socket, exc: BaseException) -> None:
    sock.setblocking(True)
    try:
        send_blocking(sock, encode(FAILED, 0, pickle.dumps(describe(exc))))
    except OSError:
        pass


def _ready(concurrent: bool) -> list[bytes]:
    return encode(READY, 0, pickle.dumps({"pid": os.getpid(), "concurrent": concurrent}))


def _user_frames(exc: BaseException) -> int:
    """How many outer traceback frames belong to this module, not to the user's code."""
    count = 0
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals is globals():
        count += 1
        tb = tb.tb_next
    return count


class _Calls:
    """What both backends share: turning payloads into calls, and outcomes into frames."""

    def __init__(self, function: Callable[..., Any], options: dict[str, Any]) -> None:
        self.function = function
        self.serializer = options["serializer"]
        self.events: bool = options["events"]
        self.exceptions: bool = options["exceptions"]

    def arguments(self, payload: bytes) -> tuple[Any, ...]:
        args = self.serializer.loads(payload)
        if type(args) is tuple:
            return args
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"the arguments arrived as {type(args).__name__}, not a sequence")
        return tuple(args)

    def result(self, call_id: int, value: Any) -> list[bytes]:
        try:
            payload = self.serializer.dumps(value)
        except BaseException as exc:
            return self.error(call_id, exc, "the worker could not serialize the result")
        return encode(RESULT, call_id, payload)

    def error(self, call_id: int, exc: BaseException, context: str | None = None) -> list[bytes]:
        name, message, text = describe(exc, _user_frames(exc))
        original = b""
        if context is not None:
            message = f"{context}: {message}"
        elif self.exceptions:
            try:
                original = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
            except BaseException:
                pass  # the parent falls back to the description
        return encode(ERROR, call_id, pickle.dumps((name, message, text, original)))


class _SyncWorker(_Calls):
    def __init__(
        self, sock: socket.socket, function: Callable[..., Any], options: dict[str, Any]
    ) -> None:
        super().__init__(function, options)
        self.sock = sock
        self.decoder = FrameDecoder()
        self.queue: deque[tuple[int, bytes]] = deque()
        retire = options.get("retire")
        self.retire = None if retire is None else _resolve(retire, "retire")

    def main(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> None:
        sock = self.sock
        sock.setblocking(True)
        try:
            if init is not None:
                init(*init_args)
        except BaseException as exc:
            _fail(sock, exc)
            return
        try:
            send_blocking(sock, _ready(False))
            while self.receive():
                if self.queue:
                    call_id, payload = self.queue.popleft()
                    reply = self.run(call_id, payload)
                    if self.retire is not None and self.should_retire():
                        # Said before the reply, so that the parent sends nothing
                        # more. Calls queued behind this one never started; the
                        # parent sees the exit and sends them to another worker.
                        send_blocking(sock, [*encode(RETIRING, 0), *reply])
                        return
                    send_blocking(sock, reply)
        except (ConnectionError, BrokenPipeError):
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
            if self.decoder.receive(self.sock, flags) == 0:
                return False
        except BlockingIOError:
            return True
        while (frame := self.decoder.next_frame()) is not None:
            kind, call_id, payload = frame
            if kind == CALL:
                self.queue.append((call_id, payload))
            elif kind == CANCEL:
                self.drop(call_id)
        return True

    def drop(self, call_id: int) -> None:
        for index, (queued_id, _) in enumerate(self.queue):
            if queued_id == call_id:
                del self.queue[index]
                send_blocking(self.sock, encode(CANCELLED, call_id))
                return
        # Otherwise it has been answered already: the parent takes that answer.

    def run(self, call_id: int, payload: bytes) -> list[bytes]:
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
        send_blocking(self.worker.sock, encode(EVENT, self.call_id, payload))


class _AsyncWorker(_Calls):
    """What the two event-loop drivers share: running calls and queueing replies.

    The drivers use their event loop directly rather than through anyio: a worker
    starts a task per call, and anyio's task groups cost several times what the
    loops' own tasks do. The user's function still runs on the parent's backend, so
    it may use anyio, or that backend, as it likes.
    """

    cancelled_class: type[BaseException]

    def __init__(
        self, sock: socket.socket, function: Callable[..., Any], options: dict[str, Any]
    ) -> None:
        super().__init__(function, options)
        self.sock = sock
        self.running: dict[int, Any] = {}
        self.outbox: deque[memoryview] = deque()
        self.outbox_size = 0
        self.writer_busy = False
        self.drained: Any = None

    def run(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    async def start(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> bool:
        """Run ``init`` and report ready; False if the worker cannot serve."""
        try:
            if init is not None:
                if is_async(init):
                    await init(*init_args)
                else:
                    init(*init_args)
        except BaseException as exc:
            _fail(self.sock, exc)
            return False
        self.sock.setblocking(False)
        self.send(_ready(True))
        return True

    async def outcome(self, call_id: int, payload: bytes) -> list[bytes]:
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

    def answer(self, call_id: int, frame: list[bytes] | None) -> None:
        """Send a call's answer (None: it was cancelled) and forget the call."""
        del self.running[call_id]
        self.send(frame if frame is not None else encode(CANCELLED, call_id), now=not self.running)

    def send(self, buffers: list[bytes], *, now: bool = True) -> None:
        """Queue a frame; send it at once if ``now``, else with the others of this batch.

        A reply goes out at once when it is the worker's only one; when many calls
        finish together, their replies go out in one ``sendmsg`` after them: one
        system call (and one wake-up of the parent) per batch instead of per reply.
        """
        for buffer in buffers:
            self.outbox.append(memoryview(buffer))
            self.outbox_size += len(buffer)
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
        outbox = self.outbox
        while outbox:
            try:
                sent = self.sock.sendmsg(itertools.islice(outbox, _MAX_BUFFERS))
            except BlockingIOError:
                return False
            except OSError:
                # The parent is gone; the reader sees end of file next.
                outbox.clear()
                self.outbox_size = 0
                break
            self.outbox_size -= sent
            while sent:
                if sent >= len(outbox[0]):
                    sent -= len(outbox.popleft())
                else:
                    outbox[0] = outbox[0][sent:]
                    sent = 0
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
    def __init__(
        self, sock: socket.socket, function: Callable[..., Any], options: dict[str, Any]
    ) -> None:
        super().__init__(sock, function, options)
        import trio

        self.trio = trio
        self.cancelled_class = trio.Cancelled
        self.wake_writer = trio.Event()

    def run(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> None:
        self.trio.run(self.main, init, init_args)

    async def main(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> None:
        if not await self.start(init, init_args):
            return
        async with self.trio.open_nursery() as nursery:
            nursery.start_soon(self.write)
            await self.read(nursery)
            # End of file: the parent is done with us (or gone). Calls still running
            # have nobody to answer to.
            nursery.cancel_scope.cancel()

    async def read(self, nursery: Any) -> None:
        trio = self.trio
        decoder = FrameDecoder()
        sock = self.sock
        while True:
            try:
                if decoder.receive(sock) == 0:
                    return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except ConnectionError:
                return
            while (frame := decoder.next_frame()) is not None:
                kind, call_id, payload = frame
                if kind == CALL:
                    scope = trio.CancelScope()
                    self.running[call_id] = scope
                    nursery.start_soon(self.serve_call, call_id, payload, scope)
                elif kind == CANCEL:
                    scope = self.running.get(call_id)
                    if scope is not None:
                        scope.cancel()
            # Let the calls just started run before reading more.
            await trio.lowlevel.checkpoint()

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

    def __init__(
        self, sock: socket.socket, function: Callable[..., Any], options: dict[str, Any]
    ) -> None:
        super().__init__(sock, function, options)
        import asyncio

        import anyio

        self.asyncio = asyncio
        self.anyio = anyio
        self.cancelled_class = asyncio.CancelledError
        self.decoder = FrameDecoder()
        self.tasks: set[Any] = set()
        self.cancelled_early: set[int] = set()

    def run(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> None:
        self.asyncio.run(self.main(init, init_args))

    async def main(self, init: Callable[..., Any] | None, init_args: tuple[Any, ...]) -> None:
        asyncio = self.asyncio
        self.loop = loop = asyncio.get_running_loop()
        if not await self.start(init, init_args):
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
            received = self.decoder.receive(self.sock)
        except BlockingIOError:
            return
        except ConnectionError:
            received = 0
        if not received:
            self.loop.remove_reader(self.sock)
            if not self.end_of_file.done():
                self.end_of_file.set_result(None)
            return
        while (frame := self.decoder.next_frame()) is not None:
            kind, call_id, payload = frame
            if kind == CALL:
                self.running[call_id] = None
                task = self.loop.create_task(self.serve_call(call_id, payload))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif kind == CANCEL and call_id in self.running:
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
        if worker.outbox_size > _HIGH_WATER:
            await worker.wait_drained()
        else:
            await worker.checkpoint()
