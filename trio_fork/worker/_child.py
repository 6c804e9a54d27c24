"""Becoming a child: a fresh signal state, the target found and run as a program.

A new child pays a copy-on-write page fault for every page it writes (in Python,
touching an object writes its reference count), so it does little before its target
runs: what it must restore is worked out in the template (:meth:`ProcessState.settle`).
"""

from __future__ import annotations

import _pickle
import _signal  # type: ignore[import-not-found]
import gc
import os
import socket
import sys

from . import _wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
_CO_COROUTINE = 0x80
_STARTED = _wire.HEADER.pack(_wire.STARTED, 1, 0, _wire.PID.size)
_prctl = 0


def prctl(option: int, value: int | bytes) -> None:
    """``prctl(2)`` with one argument, through ``_ctypes`` (``ctypes`` imports 2 ms slower)."""
    global _prctl
    import _ctypes

    _prctl = _prctl or _ctypes.dlsym(_ctypes.dlopen(None), "prctl")  # type: ignore[arg-type]
    if _ctypes.call_function(_prctl, (option, value, 0, 0, 0)):
        raise OSError(f"prctl({option}, {value!r}) failed")


def set_title(title: str) -> None:
    """What ps, top and /proc/PID/comm show for this process (15 bytes of it)."""
    prctl(PR_SET_NAME, title.encode(errors="replace")[:15])


def exit(code: int) -> NoReturn:
    """Exit a forked process, skipping ``atexit`` handlers and destructors: the template's."""
    _wire.flush_stdio()
    os._exit(code)


class Terminate(BaseException):
    """Raised by SIGTERM to interrupt whatever a template is doing and end it."""


class ProcessState:
    """What a template keeps for the processes it forks: signals and eval'd sources."""

    def __init__(self, sigint_blocked: bool) -> None:
        # The signal state of a fresh Python program, captured when the template
        # starts and given back to every child before it runs its target.
        self.fresh_handlers: dict[int, Any] = {
            sig: handler
            for sig in _signal.valid_signals()
            if (handler := _signal.getsignal(sig)) is not None
        }
        self.fresh_mask = set(_signal.pthread_sigmask(_signal.SIG_BLOCK, ()))
        # What a child must change to get back there, worked out in the template.
        self.restore_handlers: list[tuple[int, Any]] = []
        self.restore_mask = False
        self.shutting_down = False
        self.reap_theirs = False  # see settle
        self.evals = 0
        self.sources: dict[str, str] = {}  # of eval'd code, for tracebacks
        if sigint_blocked:
            self.fresh_mask.discard(_signal.SIGINT)
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
        if sigint_blocked:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGINT})
        _signal.signal(_signal.SIGTERM, self.on_sigterm)
        # What the kernel sends, with SIGCONT, to a stopped process group it orphans.
        _signal.signal(_signal.SIGHUP, self.on_sigterm)
        _signal.signal(_signal.SIGCONT, self.on_sigcont)  # and SIGCHLD: see settle
        self.parent = os.getppid()  # a template's owner (see on_sigcont)

    def on_sigterm(self, signum: int, frame: object) -> None:
        if not self.shutting_down:
            raise Terminate

    def on_sigcont(self, signum: int, frame: object) -> None:
        # A template's death signal, which wakes it if stopped; also sent when only
        # the owner's thread ended, and by job control: then the owner is our parent.
        if os.getppid() != self.parent:
            self.on_sigterm(signum, frame)

    def on_sigchld(self, signum: int, frame: object) -> None:
        pass  # only so that the wakeup fd is written; the serve loop reaps

    def settle(self) -> None:
        """After the template's state changed: keep what children must do small."""
        if (sigchld := _signal.getsignal(_signal.SIGCHLD)) in (_signal.SIG_IGN, _signal.SIG_DFL):
            # Our handler wakes the serve loop to reap. Ignored (by code run here), the
            # kernel would reap our children itself and their exits would never be
            # reported: take it back, and reap that code's processes as it asked.
            self.reap_theirs |= sigchld == _signal.SIG_IGN
            _signal.signal(_signal.SIGCHLD, self.on_sigchld)
            _signal.siginterrupt(_signal.SIGCHLD, False)
        self.restore_handlers = [
            (sig, handler)
            for sig, handler in self.fresh_handlers.items()
            if _signal.getsignal(sig) != handler
        ]
        self.restore_mask = set(_signal.pthread_sigmask(_signal.SIG_BLOCK, ())) != self.fresh_mask
        # Objects that exist now are shared with every child; the collector must never
        # walk them there, or each child would copy the pages they live on.
        gc.freeze()

    def restore(self) -> None:
        """In a new child: the signal handling of a fresh Python program."""
        # _signal's functions, not signal's wrappers: those build enums, and in a new
        # child every object touched is a page copied.
        for sig, handler in self.restore_handlers:
            _signal.signal(sig, handler)
        if self.restore_mask:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, self.fresh_mask)

    def eval(self, code: str, args: list[Any]) -> None:
        """Run ``code`` in ``__main__``, with ``args`` bound while it runs."""
        self.evals += 1
        filename = f"<trio_fork eval #{self.evals}>"
        self.sources[filename] = code
        namespace = sys.modules["__main__"].__dict__
        missing = object()
        saved = namespace.get("args", missing)
        namespace["args"] = args
        try:
            exec(compile(code, filename, "exec"), namespace)
        finally:
            if saved is missing:
                namespace.pop("args", None)
            else:
                namespace["args"] = saved

    def show_sources(self) -> None:
        """Let tracebacks show the source of eval'd code (only when one is printed)."""
        import linecache

        for filename, code in self.sources.items():
            linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)


def resolve(name: str | Callable[..., Any], what: str = "target") -> Callable[..., Any]:
    """The callable ``"module:qualname"`` names, importing the module if need be.

    A name without a module (``"doit"``) is looked up in ``__main__``; a callable is
    its own answer.
    """
    if not isinstance(name, str):
        if not callable(name):
            raise TypeError(f"{what} {name!r} is not callable")
        return name
    module_name, sep, qualname = name.rpartition(":")
    if not sep:
        module_name = "__main__"
    if not module_name or not qualname:
        raise ValueError(f"{what} {name!r} is not of the form 'module:qualname'")
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        __import__(module_name)
        obj = sys.modules[module_name]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{what} {name!r} is not callable")
    return obj  # type: ignore[no-any-return]


def is_async(obj: Any) -> bool:
    """Whether calling ``obj`` returns a coroutine (``async def``)."""
    # inspect.iscoroutinefunction, without importing inspect into every template.
    code = getattr(getattr(obj, "__func__", obj), "__code__", None)
    if code is None:
        call = getattr(type(obj), "__call__", None)  # noqa: B004 (want the code object)
        code = getattr(getattr(call, "__func__", call), "__code__", None)
    return bool(code is not None and code.co_flags & _CO_COROUTINE)


def loads(payload: bytes, fds: list[int]) -> Any:
    """Unpickle a command's payload; its out-of-band buffers are the last of ``fds``."""
    if payload[:1] != b"\0":
        return _pickle.loads(payload)
    from . import _buffers  # only then: pickle and mmap stay out of plain templates

    return _buffers.loads(*_buffers.receive(payload, _buffers.take(payload, fds)))


def run(
    sock: socket.socket, queued: list[Any], payload: bytes, fds: list[int], state: ProcessState
) -> int:
    """In a new child: run the target a SPAWN command named; the exit code."""
    try:
        target_name, backend, args = loads(payload, fds)
        target = resolve(target_name)
        set_title(target_name.rpartition(":")[2].rpartition(".")[2])
        run_backend = backend if is_async(target) else None
        state.restore()
    except BaseException as exc:
        state.show_sources()
        _wire.report(sock, _wire.ERROR, exc)
        return 1
    # The child opens its own pidfd: it is alive now, so the pidfd cannot name a
    # recycled pid, and the template has nothing to do for it.
    pidfd = os.pidfd_open(os.getpid())
    try:
        socket.send_fds(sock, [_STARTED + _wire.PID.pack(os.getpid())], [pidfd])
    except OSError:
        return 1  # the parent gave up on this child (or died) before it started: quietly
    finally:
        os.close(pidfd)
    return call(target, [sock, *queued, *args, *fds], run_backend, state)


def call(
    target: Callable[..., Any], args: list[Any], backend: str | None, state: ProcessState
) -> int:
    """Run a child's target as a program's main code would run; the exit code."""
    try:
        if backend is None:
            target(*args)
        else:
            import anyio
            from anyio.abc import UNIXSocketStream

            async def main() -> None:
                async with await UNIXSocketStream.from_socket(args[0]) as stream:
                    await target(stream, *args[1:])

            anyio.run(main, backend=backend)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else exc.code is not None
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt as exc:
        print_exception(exc, state)
        _wire.flush_stdio()
        # Like the interpreter: report death by SIGINT, not an exit code.
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGINT)
        code = 130
    except BaseException as exc:
        print_exception(exc, state)
        code = 1
    # What the interpreter does at exit: wait for the non-daemon threads.
    threading = sys.modules.get("threading")
    for thread in threading.enumerate() if threading is not None else ():
        if thread is not threading.current_thread() and not thread.daemon:  # type: ignore[union-attr]
            thread.join()
    return int(code)


def print_exception(exc: BaseException, state: ProcessState | None) -> None:
    """Print ``exc`` as the interpreter would for a program's main code."""
    exc = exc.with_traceback(_wire.user_traceback(exc))
    if state is not None:
        state.show_sources()
    if sys.excepthook is sys.__excepthook__:
        # The default hook's printer reads sources from disk; this one also finds
        # code defined with eval().
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    else:
        sys.excepthook(type(exc), exc, exc.__traceback__)
