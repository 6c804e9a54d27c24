"""The template side: a small synchronous command server.

Standard library only. A template is a plain Python process that never runs an event
loop, so forking it is safe and cheap. It serves commands from its owner on a
socketpair, one at a time and in order, and answers each one. ``FORK`` makes a new
template that serves its own socket in the same way; ``SPAWN`` makes a child that
runs a target at once. The template is the parent of what it forks: it reaps them
and reports their exit statuses, and it is a child subreaper so that nothing forked
below it is orphaned to an init that may never reap it.

A freshly forked child pays a copy-on-write page fault for every page it writes,
and in Python touching an object writes its reference count. So a child does as
little as it can before its target runs: everything it needs arrives with the
``SPAWN`` command, the signal handlers it must restore are worked out in the
template beforehand, and the template's objects are frozen out of the garbage
collector's reach.

A template ends when its owner closes the channel (end of file) or sends SIGTERM:
it kills and reaps everything below it, then exits.

A template can also serve fork requests (``SERVE_FORKS``): single messages on a
``SOCK_SEQPACKET`` socket, which any thread or process holding the other end may send
without a reply owed on the template's own channel. Each makes a new template on the
socket the request carries; that is how a template outlives one event loop (see
``trio_fork._handle``).
"""

from __future__ import annotations

# The C modules under signal and pickle: their Python wrappers import enum, re and
# more, and everything a template imports is copied (page tables at every fork) and
# torn down (at every child's exit).
import _pickle
import _signal  # type: ignore[import-not-found]
import ctypes
import gc
import os
import select
import socket
import sys

from trio_fork._protocol import (
    ARGS,
    ERROR,
    EVAL,
    EXIT_STATUS,
    EXITED,
    FDS,
    FORK,
    FORKED,
    HEADER,
    HELLO,
    KILL,
    OK,
    PID,
    READY,
    RECEIVE_SIZE,
    REQUIRE,
    SEQ,
    SERVE_FORKS,
    SPAWN,
    STARTED,
    Frame,
    FrameReader,
    close_all,
    describe_exception,
    encode,
    parse_ancillary,
    receive,
    send_blocking,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

_STARTED_HEADER = HEADER.pack(STARTED, 1, PID.size)
_NO_SEQ = SEQ.pack(0)
_PR_SET_PDEATHSIG = 1
_REQUEST_ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 4)
_PR_SET_CHILD_SUBREAPER = 36
_SIGKILL = int(_signal.SIGKILL)
_SIGTERM = int(_signal.SIGTERM)
_CO_COROUTINE = 0x80

_libc = ctypes.CDLL(None, use_errno=True)

# The signal state of a fresh Python program, captured when the template starts and
# given back to every child before it runs its target.
_fresh_handlers: dict[int, Any] = {}
_fresh_mask: set[int] = set()
# What a child must change to get back there, worked out in the template.
_restore_handlers: list[tuple[int, Any]] = []
_restore_mask = False
_shutting_down = False
_evals = 0
# The source of eval'd code, for tracebacks (see _show_sources).
_sources: dict[str, str] = {}


class _Terminate(BaseException):
    """Raised by SIGTERM to interrupt whatever a template is doing and end it."""


class _ChannelClosed(Exception):
    """The owner's end of the channel is gone."""


def _on_sigterm(signum: int, frame: object) -> None:
    if not _shutting_down:
        raise _Terminate


def _on_sigchld(signum: int, frame: object) -> None:
    # Only here so that the wakeup fd is written; reaping happens in the serve loop.
    pass


def _capture_fresh_signal_state() -> None:
    for sig in _signal.valid_signals():
        try:
            handler = _signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler is not None:
            _fresh_handlers[sig] = handler
    _fresh_mask.update(_signal.pthread_sigmask(_signal.SIG_BLOCK, ()))


def _plan_signal_restore() -> None:
    global _restore_mask
    _restore_handlers[:] = [
        (sig, handler)
        for sig, handler in _fresh_handlers.items()
        if _signal.getsignal(sig) != handler
    ]
    _restore_mask = set(_signal.pthread_sigmask(_signal.SIG_BLOCK, ())) != _fresh_mask


def _restore_fresh_signal_state() -> None:
    # _signal's functions, not signal's wrappers: those build enums, and in a new
    # child every object touched is a page copied.
    for sig, handler in _restore_handlers:
        _signal.signal(sig, handler)
    if _restore_mask:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, _fresh_mask)


def _settle() -> None:
    """After the template's state changed: keep what children must do small."""
    _plan_signal_restore()
    # Objects that exist now are shared with every child; the collector must never
    # walk them there, or each child would copy the pages they live on.
    gc.freeze()


def flush_stdio() -> None:
    """Flush stdout and stderr, before a fork or an exit that skips the interpreter's."""
    # Before a fork, or the new process would write out a second copy of the buffer.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _exit(code: int) -> NoReturn:
    # Never run the template's atexit handlers or the destructors of inherited
    # objects in a forked process: they belong to the template.
    flush_stdio()
    os._exit(code)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _import(name: str) -> Any:
    # importlib.import_module, without importing importlib into every template.
    __import__(name)
    return sys.modules[name]


def resolve(name: str, what: str = "target") -> Callable[..., Any]:
    """The callable ``"module:qualname"`` names, importing the module if need be."""
    module_name, sep, qualname = name.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"{what} {name!r} is not of the form 'module:qualname'")
    obj: Any = sys.modules.get(module_name) or _import(module_name)
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


def _run_async(
    target: Callable[..., Any], sock: socket.socket, args: list[Any], backend: str
) -> None:
    import anyio
    from anyio.abc import UNIXSocketStream

    async def main() -> None:
        async with await UNIXSocketStream.from_socket(sock) as stream:
            await target(stream, *args)

    anyio.run(main, backend=backend)


def _join_threads() -> None:
    # What the interpreter does at exit: wait for the non-daemon threads.
    threading = sys.modules.get("threading")
    if threading is None:
        return
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()


def _print_exception(exc: BaseException) -> None:
    # As the interpreter would for a program's main code: from the target down.
    traceback = exc.__traceback__
    if traceback is not None and traceback.tb_frame.f_code is _call.__code__:
        exc = exc.with_traceback(traceback.tb_next)
    _show_sources()
    if sys.excepthook is sys.__excepthook__:
        # The default hook's printer reads sources from disk; this one also finds
        # code defined with eval().
        import traceback as tb

        tb.print_exception(type(exc), exc, exc.__traceback__)
    else:
        sys.excepthook(type(exc), exc, exc.__traceback__)


def _show_sources() -> None:
    # Only when a traceback is about to be formatted: linecache and what it imports
    # stay out of templates that never fail.
    import linecache

    for filename, code in _sources.items():
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)


def _describe(exc: BaseException) -> tuple[str, str, str]:
    _show_sources()
    return describe_exception(_from_caller(exc))


def _from_caller(exc: BaseException) -> BaseException:
    # A remote traceback starts where the user's code (or the import) does.
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_frame.f_code.co_filename == __file__:
        traceback = traceback.tb_next
    return exc.with_traceback(traceback)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _call(
    target: Callable[..., Any], sock: socket.socket, args: list[Any], backend: str | None
) -> int:
    """Run a child's target as a program's main code would run; the exit code."""
    try:
        if backend is None:
            target(sock, *args)
        else:
            _run_async(target, sock, args, backend)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt as exc:
        _print_exception(exc)
        flush_stdio()
        # Like the interpreter: report death by SIGINT, not an exit code.
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGINT)
        code = 130
    except BaseException as exc:
        _print_exception(exc)
        code = 1
    _join_threads()
    return code


def _list_children() -> set[int]:
    children: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as file:
                children.update(int(pid) for pid in file.read().split())
        except OSError:
            pass
    return children


def _run(sock: socket.socket, queued: list[Any], payload: bytes, fds: list[int]) -> int:
    """In a new child: run the target a SPAWN command named; the exit code."""
    try:
        target_name, backend, args = _pickle.loads(payload)
        target = resolve(target_name)
        run_backend = backend if is_async(target) else None
        _restore_fresh_signal_state()
    except BaseException as exc:
        error = _NO_SEQ + _pickle.dumps(_describe(exc))
        send_blocking(sock, encode(ERROR, error))
        return 1
    # The child opens its own pidfd: it is alive now, so the pidfd cannot name a
    # recycled pid, and the template has nothing to do for it.
    pid = os.getpid()
    pidfd = os.pidfd_open(pid)
    sock.sendmsg(
        [_STARTED_HEADER + PID.pack(pid)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, pidfd.to_bytes(4, sys.byteorder))],
    )
    os.close(pidfd)
    return _call(target, sock, [*queued, *args, *fds], run_backend)


class _Server:
    """Serves one template's channel."""

    def __init__(self, sock: socket.socket, queue: list[Any], buffer: memoryview) -> None:
        self.sock = sock
        self.queue = queue
        self.buffer = buffer
        self.reader = FrameReader()
        self.pid = os.getpid()
        self.seq = 0  # of the next command
        self.children: dict[int, int] = {}  # pid -> sequence number of its command
        self.wakeup: tuple[int, int] | None = None
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        # SERVE_FORKS: the request socket, and for each template forked on request
        # the pipe to close once it is reaped.
        self.forks: socket.socket | None = None
        self.reaped: dict[int, int] = {}

    def reply(self, op: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> None:
        try:
            if fds:
                send_blocking(self.sock, encode(op, payload, fds))
            else:
                self.sock.sendall(HEADER.pack(op, 0, len(payload)) + payload)
        except OSError as exc:
            raise _ChannelClosed from exc

    def become_template(self) -> None:
        """Get ready to fork: reap children promptly and adopt orphans below us."""
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.poller.register(read_end, select.POLLIN)
        self.wakeup = (read_end, write_end)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)

    def serve(self) -> None:
        """Serve commands until end of file, SIGTERM or a broken channel."""
        try:
            while True:
                frame = self.reader.next_frame()
                if frame is not None:
                    self.handle(frame)
                    continue
                for fd, _ in self.poller.poll():
                    if self.forks is not None and fd == self.forks.fileno():
                        self.fork_on_request()
                    elif fd != self.sock.fileno():
                        self.reap()
                    elif not receive(self.sock, self.reader, self.buffer):
                        return
        except (_Terminate, _ChannelClosed, ConnectionError):
            return

    def handle(self, frame: Frame) -> None:
        op = frame.op
        seq = self.seq
        self.seq += 1
        try:
            if frame.fds_lost:
                raise OSError(
                    "file descriptors were lost in transit: the kernel truncated the "
                    "control message (is RLIMIT_NOFILE too low?)"
                )
            if op in (FORK, SPAWN):
                self.fork(seq, frame.fds, frame.payload if op == SPAWN else None)
                return
            if op == KILL:
                self.kill(*SEQ.unpack(frame.payload))
                return
            if op == HELLO:
                self.hello(seq)
                return
            if op == REQUIRE:
                for name in _pickle.loads(frame.payload):
                    _import(name)
            elif op == EVAL:
                self.eval(*_pickle.loads(frame.payload))
            elif op == ARGS:
                self.queue.extend(_pickle.loads(frame.payload))
            elif op == FDS:
                self.queue.extend(frame.fds)
            elif op == SERVE_FORKS:
                self.serve_forks(frame.fds, frame.payload)
            else:
                raise ValueError(f"unknown command {op}")
        except (_Terminate, _ChannelClosed):
            raise
        except BaseException as exc:
            close_all(frame.fds)
            _settle()
            self.reply(ERROR, SEQ.pack(seq) + _pickle.dumps(_describe(exc)))
        else:
            _settle()
            self.reply(OK, SEQ.pack(seq))

    def eval(self, code: str, args: list[Any]) -> None:
        global _evals
        _evals += 1
        filename = f"<trio_fork eval #{_evals}>"
        _sources[filename] = code
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

    def fork(self, seq: int, fds: list[int], payload: bytes | None) -> None:
        """FORK (payload None: a new template) or SPAWN (a child running a target)."""
        if not fds or (payload is None and len(fds) != 1):
            raise ValueError("FORK takes one socket, SPAWN a socket and the target's fds")
        if self.wakeup is None:
            self.become_template()
        flush_stdio()
        pid = os.fork()
        if pid == 0:
            self.in_new_process(fds, payload)
        # Little to do here: until the child exits, every page this process writes
        # is copied.
        close_all(fds)
        fds.clear()
        self.children[pid] = seq
        if payload is None:
            pidfd = os.pidfd_open(pid)
            try:
                self.reply(FORKED, SEQ.pack(seq) + PID.pack(pid), [pidfd])
            finally:
                os.close(pidfd)

    def kill(self, seq: int) -> None:
        for pid, made_by in self.children.items():
            if made_by == seq:
                # Not reaped yet, so the pid cannot have been recycled.
                os.kill(pid, _signal.SIGKILL)
                return

    def hello(self, seq: int | None) -> None:
        """READY with our pid and a pidfd: asked by HELLO (seq), or unasked (None)."""
        pidfd = os.pidfd_open(os.getpid())
        try:
            identity = _pickle.dumps((os.getpid(), tuple(sys.version_info[:3])))
            self.reply(READY, (b"" if seq is None else SEQ.pack(seq)) + identity, [pidfd])
        finally:
            os.close(pidfd)

    def serve_forks(self, fds: list[int], payload: bytes) -> None:
        if len(fds) != 1:
            raise ValueError("SERVE_FORKS takes exactly one socket")
        if self.forks is not None:
            raise ValueError("this template already serves fork requests")
        requests = socket.socket(fileno=fds.pop())
        if requests.type != socket.SOCK_SEQPACKET:
            requests.close()
            raise ValueError("SERVE_FORKS needs a SOCK_SEQPACKET socket")
        if self.wakeup is None:
            self.become_template()
        if payload == b"outlive the thread":
            # PR_SET_PDEATHSIG fires when the *thread* that started us ends, and this
            # template must outlive it; its owner's death still reaches it as end of
            # file on the channel.
            _prctl(_PR_SET_PDEATHSIG, 0)
        self.forks = requests
        self.poller.register(requests, select.POLLIN)

    def fork_on_request(self) -> None:
        assert self.forks is not None
        try:
            data, ancdata, flags, _ = self.forks.recvmsg(
                1, _REQUEST_ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return
        fds = parse_ancillary(ancdata)
        if not data and not fds:
            # Every requester is gone: stay a template, just stop listening.
            self.poller.unregister(self.forks)
            self.forks.close()
            self.forks = None
            return
        if len(fds) != 2 or flags & socket.MSG_CTRUNC:
            # Not a request we can answer; closing what came tells the sender.
            close_all(fds)
            return
        channel, reaped = fds
        flush_stdio()
        try:
            pid = os.fork()
        except OSError as exc:
            # The requester waits on the new channel: tell it there.
            try:
                with socket.socket(fileno=os.dup(channel)) as sock:
                    send_blocking(
                        sock, encode(ERROR, _NO_SEQ + _pickle.dumps(describe_exception(exc)))
                    )
            except OSError:
                pass
            close_all(fds)
            return
        if pid == 0:
            os.close(reaped)
            self.in_new_process([channel], None, announce=True)
        os.close(channel)
        # Not in self.children: nobody reads our channel for its exit status. The
        # requester learns that it is reaped when this pipe closes.
        self.reaped[pid] = reaped

    def leave_template(self, death_signal: int) -> None:
        """In a new process: stop being part of this template."""
        # Dies, or shuts down (see _on_sigterm), when this template dies.
        _prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != self.pid:
            _exit(1)
        _signal.set_wakeup_fd(-1)
        # Nothing of the template's machinery may leak into the new process. Raw
        # closes: the objects that held these die unused with the process.
        os.close(self.sock.fileno())
        if self.wakeup is not None:
            os.close(self.wakeup[0])
            os.close(self.wakeup[1])
        if self.forks is not None:
            os.close(self.forks.fileno())
        for reaped in self.reaped.values():
            os.close(reaped)
        if self.reader.holds_fds:
            self.reader.close()

    def in_new_process(
        self, fds: list[int], payload: bytes | None, announce: bool = False
    ) -> NoReturn:
        code = 1
        try:
            # A child dies with its template. A new template shuts down instead (see
            # _on_sigterm), so that it still kills and reaps everything below it.
            self.leave_template(_SIGKILL if payload is not None else _SIGTERM)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fds[0])
            if payload is not None:
                code = _run(sock, self.queue, payload, fds[1:])
            else:
                server = _Server(sock, list(self.queue), self.buffer)
                if announce:
                    server.hello(None)
                server.serve()
                server.shutdown()
                code = 0
        except (_Terminate, _ChannelClosed):
            # Ended, or its requester gone, before it served anything: nothing to say.
            code = 0
        except BaseException as exc:
            _print_exception(exc)
        finally:
            _exit(code)

    def reap(self) -> None:
        assert self.wakeup is not None
        try:
            while os.read(self.wakeup[0], 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            seq = self.children.pop(pid, None)
            if seq is not None:
                self.reply(EXITED, EXIT_STATUS.pack(seq, os.waitstatus_to_exitcode(status)))
            reaped = self.reaped.pop(pid, None)
            if reaped is not None:
                os.close(reaped)

    def shutdown(self) -> None:
        """Kill and reap everything below this process."""
        global _shutting_down
        _shutting_down = True
        self.reader.close()
        if self.wakeup is None and not self.children:
            return
        killed: set[int] = set()
        while True:
            # Orphans below us are adopted as they appear, so look again each time.
            for pid in (_list_children() | self.children.keys()) - killed:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.add(pid)
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


def main(fd: int, owner: int, sigint_blocked: bool) -> None:
    """Run a template started by ``open_template``, serving the socket ``fd``.

    ``owner`` is the pid of the process that started it. ``sigint_blocked`` says
    that it blocked SIGINT for the start-up, so that a Ctrl-C before SIGINT is
    ignored here cannot make this template print a KeyboardInterrupt traceback.
    """
    _capture_fresh_signal_state()
    if sigint_blocked:
        _fresh_mask.discard(_signal.SIGINT)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    if sigint_blocked:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGINT})
    _signal.signal(_signal.SIGTERM, _on_sigterm)
    _signal.signal(_signal.SIGCHLD, _on_sigchld)
    _signal.siginterrupt(_signal.SIGCHLD, False)
    server = _Server(socket.socket(fileno=fd), [], memoryview(bytearray(RECEIVE_SIZE)))
    global _shutting_down
    try:
        try:
            # If the owner dies, even while this template runs a long command: shut
            # down as when it closes the channel, and take everything below down too.
            _prctl(_PR_SET_PDEATHSIG, _SIGTERM)
            if os.getppid() != owner:
                raise _Terminate
            server.become_template()
            _settle()
            server.reply(READY, _pickle.dumps((os.getpid(), tuple(sys.version_info[:3]))))
            server.serve()
        finally:
            # The owner closes the channel and then sends SIGTERM: a SIGTERM that
            # lands after serve() returned must be caught here too, not in shutdown().
            _shutting_down = True
    except (_Terminate, _ChannelClosed):
        pass
    server.shutdown()
    flush_stdio()


def main_in_fork(fd: int, parent: int) -> NoReturn:
    """Serve ``fd`` in a process just forked from a running program, then exit.

    Used by ``trio_fork.fork_main_template``: the program, with everything it has
    imported, becomes a template. It never returns into the program's code, and never
    runs the program's ``atexit`` handlers.
    """
    code = 1
    try:
        # As for a template from open_template: workers must not read the program's
        # terminal.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        # main() ends it with the program (PR_SET_PDEATHSIG): safe, since the program
        # had one thread, the one that forked it.
        main(fd, parent, False)
        code = 0
    except BaseException as exc:
        _print_exception(exc)
    finally:
        _exit(code)
