"""Templates that outlive an event loop: started or forked once, opened from any loop.

A :class:`TemplateHandle` owns a template process from plain synchronous code, the way
a :class:`subprocess.Popen` owns a process. It never carries commands once started:
its process serves fork requests (``SERVE_FORKS``), each one ``SOCK_SEQPACKET``
message carrying the new template's socket. A message is sent whole or not at all,
so any thread, task or event loop can send one without a lock or a reader of
replies, and every :meth:`TemplateHandle.open` gets a template of its own, forked
from the handle's, with a channel of its own in whatever event loop is running.

The forked template is not our child but the handle process's. That process reaps
it, then closes a pipe that came with the request, so the opener knows when the
template is not only dead but gone.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import os
import pickle
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import final

import anyio
import attrs
import sniffio

from . import _serve, _template
from ._channel import Channel, receive_frame, remote_error
from ._errors import BrokenTemplateError
from ._protocol import (
    ERROR,
    OK,
    READY,
    RECEIVE_SIZE,
    REQUIRE,
    SERVE_FORKS,
    Frame,
    FrameReader,
    ancillary,
    close_all,
    encode,
    receive,
    send_blocking,
)
from ._template import _CLOSE_TIMEOUT, _PYTHON_VERSION, Template, _launch, module_names

# Run in a fork of a template we started (the early one, or a test session's) when
# this process's sys.path, directory or environment changed since: it makes the fork
# what open_template() would start now. It binds no name, so __main__ stays pristine.
_ALIGN = """\
__import__("sys").path[:] = args[0]
__import__("os").chdir(args[1])
__import__("os").environ.clear()
__import__("os").environ.update(args[2])
"""

# What _ALIGN applies: sys.path, working directory, environment.
_Setup = tuple[list[str], str, dict[str, str]]

# Every handle alive in this process, so that a forked copy of the process can let go
# of them (see _forget_all_in_child).
_live: weakref.WeakSet[TemplateHandle] = weakref.WeakSet()
_early_lock = threading.Lock()


@final
@attrs.define(eq=False, init=False)
class TemplateHandle:
    """A template process owned by synchronous code, usable from any event loop.

    Made by :func:`start_template` or :func:`fork_main_template`, never directly.
    :meth:`open` forks the handle's template into a new :class:`Template` for the
    duration of a block, in whatever event loop runs it: trio or asyncio, one
    ``run`` after another, in any thread, and as many at once as you like. What a
    block does to its template (``require``, ``eval``, ``send_args``...) ends with
    the block; the handle's template stays as it was.

    The handle owns its process: it ends when you call :meth:`close` (or leave a
    ``with`` block on the handle), and at the latest when this interpreter exits.
    Ending it ends every template forked from it and everything those started. If
    this process dies without cleaning up, the handle's process sees end of file on
    its channel and ends the same way.
    """

    _kind: str
    _pid: int
    _pidfd: int
    _channel: socket.socket
    _requests: socket.socket
    _process: subprocess.Popen[bytes] | None
    # Whether the template's __main__ is this program's (see Template._shares_main).
    _shares_main: bool
    # The sys.path, directory and environment of a template started by us; None for
    # a copy of this program.
    _setup: _Setup | None
    _owner: int
    _lock: threading.Lock
    _closed: bool
    # An open() found the process gone (it may not have finished exiting yet).
    _broken: bool

    @classmethod
    def _create(
        cls,
        kind: str,
        pid: int,
        pidfd: int,
        channel: socket.socket,
        requests: socket.socket,
        process: subprocess.Popen[bytes] | None,
        setup: _Setup | None,
    ) -> TemplateHandle:
        self = cls.__new__(cls)
        self._kind = kind
        # Forked from this program (no interpreter started): its __main__ is ours.
        self._shares_main = process is None
        self._setup = setup
        self._pid = pid
        self._pidfd = pidfd
        self._channel = channel
        self._requests = requests
        self._process = process
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._broken = False
        # Non-blocking for every opener: they send on duplicates, which share it.
        requests.setblocking(False)
        _live.add(self)
        atexit.register(self._close_at_exit)
        return self

    def __repr__(self) -> str:
        state = " (closed)" if self._closed else ""
        return f"<trio_fork.TemplateHandle: {self._kind} {self._pid}{state}>"

    @property
    def pid(self) -> int:
        """The process id of the handle's template, a child of this process."""
        return self._pid

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run; :meth:`open` then raises."""
        return self._closed

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Template]:
        """Fork the handle's template into a new template for the duration of the block.

        The new template starts with what the handle's template has: its imported
        modules and the globals of its ``__main__``. It has the full
        :class:`Template` API. Leaving the block ends it and everything it started,
        as leaving :func:`open_template` does, and waits until it has been reaped;
        the handle's template carries on. The new template is a child of the
        handle's template, not of this process (see :attr:`Template.pid`).

        Raises:
            anyio.ClosedResourceError: The handle was closed.
            BrokenTemplateError: The handle's process has died.
            RemoteError: The handle's process could not fork.
        """
        async with self._open() as template:
            yield template

    @asynccontextmanager
    async def _open_aligned(
        self,
        preload: list[str],
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
    ) -> AsyncIterator[Template]:
        """A fork that is what ``open_template(preload, env=env, cwd=cwd)`` would start now."""
        setup = _setup_now(env, cwd)
        async with self._open() as template:
            # Usually nothing changed since the handle's template started; then the
            # fork is right as it is, and saves a round trip.
            if setup != self._setup:
                await template.eval(_ALIGN, *setup)
            if preload:
                await template.require(*preload)
            yield template

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Template]:
        ours, theirs = socket.socketpair()
        reaped_read, reaped_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            with self._duplicate_requests() as requests:
                await _send_request(requests, [theirs.fileno(), reaped_write], self)
        except BaseException as exc:
            self._broken = self._broken or isinstance(exc, BrokenTemplateError)
            ours.close()
            os.close(reaped_read)
            raise
        finally:
            theirs.close()
            os.close(reaped_write)
        ours.setblocking(False)
        try:
            ready = await receive_frame(ours)
            pid, pidfd = self._check_ready(ready)
        except BaseException:
            # The request may yet be served: whatever it forks must not outlive us.
            ours.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
                await anyio.wait_readable(reaped_read)
            os.close(reaped_read)
            raise
        template = Template._create(Channel(ours, ""), pid, pidfd, None, None, reaped=reaped_read)
        template._shares_main = self._shares_main
        async with template._serving():
            yield template

    def _check_ready(self, ready: Frame | None) -> tuple[int, int]:
        if ready is None:
            self._broken = True
            raise BrokenTemplateError(f"the process of {self!r} has died")
        if ready.op == ERROR:
            raise remote_error(ready)
        if ready.op != READY or len(ready.fds) != 1:
            close_all(ready.fds)
            raise BrokenTemplateError(f"{self!r} answered a fork request with {ready.op}")
        pid, _ = pickle.loads(ready.payload)
        return int(pid), ready.fds[0]

    def _duplicate_requests(self) -> socket.socket:
        # A duplicate per opener: close() may close the original meanwhile, and
        # trio lets only one task at a time wait for a given descriptor.
        with self._lock:
            if self._closed:
                raise anyio.ClosedResourceError(f"{self!r} is closed")
            return self._requests.dup()

    def close(self) -> None:
        """End the handle's template and everything forked from it; wait until reaped.

        Blocks until then, usually for a millisecond or so. Templates still open
        from this handle end too: their users get :exc:`BrokenTemplateError`.
        Closing a closed handle does nothing.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _live.discard(self)
        atexit.unregister(self._close_at_exit)
        self._requests.close()
        self._channel.close()
        # End of file alone would end it too; SIGTERM does not wait for it to notice.
        _signal(self._pidfd, signal.SIGTERM)
        if not _wait_readable(self._pidfd, _CLOSE_TIMEOUT):
            _signal(self._pidfd, signal.SIGKILL)
        _reap(self._pid, self._pidfd, self._process)

    def __enter__(self) -> TemplateHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _exited(self) -> bool:
        return _wait_readable(self._pidfd, 0)

    def _close_at_exit(self) -> None:
        if os.getpid() == self._owner:
            self.close()

    def _forget(self) -> None:
        """In a forked copy of the owner: let go of the descriptors, touch nothing else."""
        # Another thread of the owner may have held the lock when it forked.
        self._lock = threading.Lock()
        if not self._closed:
            self._closed = True
            self._requests.close()
            self._channel.close()
            os.close(self._pidfd)


def start_template(
    preload: Iterable[str] = (),
    *,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> TemplateHandle:
    """Start a template process that outlives event loops, and return its handle.

    The synchronous counterpart of :func:`open_template`, for templates that must
    serve several event loops one after another (each test of a test suite, each
    ``trio.run`` of a program) or several threads. The template is the same: a fresh
    interpreter with only the standard library and ``preload`` imported. Use it
    through :meth:`TemplateHandle.open`, which forks it.

    It blocks until the template is ready and ``preload`` is imported: call it
    outside an event loop, or in a worker thread.

    Args:
        preload: Modules to import in the template before it is handed out.
        python: The interpreter to run (default: :data:`sys.executable`).
        env: The template's environment, as in :mod:`subprocess`.
        cwd: The template's working directory, as in :mod:`subprocess`.

    Raises:
        OSError: The interpreter could not be started.
        BrokenTemplateError: The template exited before it was ready.
        RemoteError: A preloaded module failed to import.
    """
    return _start(module_names(preload, "preload"), python, env, cwd, "template")


def _start(
    modules: list[str],
    python: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    kind: str,
) -> TemplateHandle:
    executable = os.fspath(python) if python is not None else sys.executable
    if not executable:
        raise RuntimeError("sys.executable is unknown here: pass python= to start_template")
    process, channel = _launch(executable, env, cwd)
    try:
        setup = _setup_now(env, cwd)
        pidfd = os.pidfd_open(process.pid)
    except BaseException:
        channel.close()
        process.kill()
        process.wait()
        raise
    return _serve_forks(kind, process.pid, pidfd, channel, process, modules, executable, setup)


def fork_main_template() -> TemplateHandle:
    """Fork this program, as it is now, into a template; return its handle.

    Python's counterpart of AnyEvent::Fork::Template. The template is a copy of this
    process with every module imported so far and every global defined so far, so
    a target can be any function of the program, ``__main__`` included, and costs
    nothing to import in the children. Call it once the program has imported and
    defined what workers need, and before it starts an event loop or a thread: then
    open the handle from any event loop with :meth:`TemplateHandle.open`.

    The template's standard input is ``/dev/null``; it shares this process's other
    descriptors, as any fork does: open files, sockets and pipes the program holds
    at this point are open in the template and in every worker forked from it. It
    never runs the program's ``atexit`` handlers or returns into its code.

    The handle owns the template: it ends with :meth:`TemplateHandle.close` or at
    interpreter exit, and also if this process dies (the template has
    ``PR_SET_PDEATHSIG`` set).

    Raises:
        RuntimeError: An event loop is running, or this process has other threads:
            forking it then is unsafe (a copied lock could be held forever).
    """
    _check_fork_is_safe()
    ours, theirs = socket.socketpair()
    parent = os.getpid()
    _serve.flush_stdio()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _serve.main_in_fork(theirs.detach(), parent)
    theirs.close()
    try:
        pidfd = os.pidfd_open(pid)
    except BaseException:
        ours.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return _serve_forks("main-program template", pid, pidfd, ours, None, [], sys.executable, None)


def start_early() -> None:
    """Keep a pristine template, and make :func:`open_template` fork it from now on.

    Python's counterpart of AnyEvent::Fork::Early. It starts one small template
    interpreter (only the standard library imported) and keeps it; afterwards every
    :func:`open_template` without ``python=`` asks it to fork instead of starting an
    interpreter, so opening a template costs a fork, not an interpreter start-up. The
    template you get is the one you would have got: :func:`open_template` applies
    this process's current ``sys.path``, working directory and environment (or its
    ``env`` and ``cwd`` arguments) to it. Settings an interpreter reads only when it
    starts, such as ``PYTHONHASHSEED`` or ``-X`` options, are those of the moment
    :func:`start_early` ran.

    Call it first thing in the program, before any event loop runs: it blocks while
    that one interpreter starts (tens of milliseconds). Calling it again while
    the early template runs does nothing.

    A template opened after :func:`start_early` is a child of the early template,
    not of this process (see :attr:`Template.pid`); leaving its block still ends it
    and waits until it has been reaped. The early template ends with
    :func:`stop_early`, at interpreter exit, or when this process dies. If it is
    killed from outside, :func:`open_template` raises :exc:`BrokenTemplateError`
    until :func:`stop_early` is called, or :func:`start_early` again, which replaces
    it.
    """
    with _early_lock:
        early = _template._early
        if early is not None and not (early.closed or early._broken or early._exited()):
            return
        if early is not None:
            early.close()  # it died: reap it, and start another
        _template._early = _start([], None, None, None, "early template")


def stop_early() -> None:
    """End the early template; :func:`open_template` starts interpreters again.

    Templates opened from it and still in use end too. Does nothing if
    :func:`start_early` has not run.
    """
    with _early_lock:
        early, _template._early = _template._early, None
    if early is not None:
        early.close()


def _serve_forks(
    kind: str,
    pid: int,
    pidfd: int,
    channel: socket.socket,
    process: subprocess.Popen[bytes] | None,
    modules: list[str],
    python: str,
    setup: _Setup | None,
) -> TemplateHandle:
    """Handshake with a template just started or forked, and make it a fork server."""
    requests, served = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        channel.setblocking(True)
        reader = FrameReader()
        buffer = memoryview(bytearray(RECEIVE_SIZE))
        ready = _receive_sync(channel, reader, buffer)
        if ready is None or ready.op != READY:
            _signal(pidfd, signal.SIGKILL)
            code = _reap(pid, pidfd, process)
            pidfd = -1
            raise BrokenTemplateError(
                f"the {kind} ({python}) exited with status {code} before it was ready "
                "(its stderr may say why)"
            )
        _, version = pickle.loads(ready.payload)
        if tuple(version[:2]) != _PYTHON_VERSION:
            raise BrokenTemplateError(
                f"the {kind} ({python}) runs Python {'.'.join(map(str, version[:2]))} but "
                f"this process runs {'.'.join(map(str, _PYTHON_VERSION))}: a template "
                "imports from this process's sys.path, so it must run the same version"
            )
        if modules:
            _request_sync(channel, reader, buffer, REQUIRE, pickle.dumps(modules))
        # A template we started dies with the thread that started it (see main() in
        # _serve), unless told otherwise; the handle may outlive a worker thread.
        outlive = process is not None and threading.current_thread() is not threading.main_thread()
        payload = b"outlive the thread" if outlive else b""
        _request_sync(channel, reader, buffer, SERVE_FORKS, payload, fds=[served.detach()])
    except BaseException:
        requests.close()
        served.close()
        channel.close()
        if pidfd >= 0:
            _signal(pidfd, signal.SIGKILL)
            _reap(pid, pidfd, process)
        raise
    return TemplateHandle._create(kind, pid, pidfd, channel, requests, process, setup)


def _request_sync(
    sock: socket.socket,
    reader: FrameReader,
    buffer: memoryview,
    op: int,
    payload: bytes = b"",
    fds: list[int] | None = None,
) -> None:
    try:
        send_blocking(sock, encode(op, payload, fds or []))
    except OSError as exc:
        raise BrokenTemplateError("the template died before it was ready") from exc
    finally:
        close_all(fds or [])
    reply = _receive_sync(sock, reader, buffer)
    if reply is None:
        raise BrokenTemplateError("the template died before it was ready")
    if reply.op == ERROR:
        raise remote_error(reply)
    if reply.op != OK:
        close_all(reply.fds)
        raise BrokenTemplateError(f"the template answered {reply.op} instead of OK")


def _receive_sync(sock: socket.socket, reader: FrameReader, buffer: memoryview) -> Frame | None:
    try:
        while (frame := reader.next_frame()) is None:
            if not receive(sock, reader, buffer):
                return None
    except OSError:
        return None
    return frame


async def _send_request(requests: socket.socket, fds: list[int], handle: TemplateHandle) -> None:
    while True:
        try:
            requests.sendmsg([b"F"], ancillary(fds))
            return
        except BlockingIOError:
            # The handle's process has a backlog of requests: wait for room.
            await anyio.wait_writable(requests)
        except OSError as exc:
            raise BrokenTemplateError(f"the process of {handle!r} has died") from exc


def _setup_now(env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None) -> _Setup:
    """The ``sys.path``, directory and environment open_template would give a template."""
    path = [os.path.abspath(entry) for entry in sys.path if isinstance(entry, str)]
    if cwd is None:
        where = os.getcwd()
    else:
        where = os.path.abspath(cwd)
        # The error open_template raises when it cannot start an interpreter there.
        try:
            if not stat.S_ISDIR(os.stat(where).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        except OSError as exc:
            raise type(exc)(
                exc.errno, f"cannot start a template in {os.fspath(cwd)!r}: {exc.strerror}"
            ) from None
    environment = dict(os.environ if env is None else env)
    for key, value in environment.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env: keys and values must be str, not {key!r}: {value!r}")
    return path, where, environment


def _check_fork_is_safe() -> None:
    library = _running_event_loop()
    if library is not None:
        raise RuntimeError(
            f"fork_main_template() must run before any event loop starts, but {library} "
            "is running here: a forked copy of a running event loop is unsafe to use"
        )
    others = len(os.listdir("/proc/self/task")) - 1
    if others:
        current = threading.current_thread()
        names = [thread.name for thread in threading.enumerate() if thread is not current]
        raise RuntimeError(
            f"fork_main_template() needs a single-threaded process, but {others} other "
            f"thread(s) run here ({', '.join(names) or 'none started by Python'}): a "
            "forked copy could inherit a lock that one of them holds, and hang"
        )


def _running_event_loop() -> str | None:
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        pass
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "asyncio"


def _signal(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def _reap(pid: int, pidfd: int, process: subprocess.Popen[bytes] | None) -> int | None:
    """Wait for our child to exit and reap it; its exit status (None if not ours to know)."""
    try:
        if process is not None:
            return process.wait()
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            # Someone else in this process reaped it (a waitpid(-1) somewhere).
            return None
        return os.waitstatus_to_exitcode(status)
    finally:
        os.close(pidfd)


def _forget_all_in_child() -> None:
    # A forked copy of this process must not keep the handles' sockets open (their
    # processes end when their owner's end closes), nor end processes it does not own.
    for handle in list(_live):
        handle._forget()
    _live.clear()
    _template._early = None


os.register_at_fork(after_in_child=_forget_all_in_child)
