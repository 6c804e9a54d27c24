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

import atexit
import errno
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import NoReturn, final

import anyio
import attrs

from ._arguments import module_names
from ._channel import Channel, remote_error
from ._construct import NoPublicConstructor
from ._errors import BrokenTemplateError
from ._process import (
    CLOSE_TIMEOUT,
    check_fork_is_safe,
    check_ready,
    launch,
    readable,
    reap,
    signal_pidfd,
)
from ._template import Template
from ._transport import Transport, receive_frame
from .worker import _template as _worker_template
from .worker import _wire
from .worker._child import exit as exit_now
from .worker._child import print_exception
from .worker._template import align

# What align() applies: sys.path, working directory, environment.
_Setup = tuple[list[str], str, dict[str, str]]

# Every handle alive in this process, so that a forked copy of the process can let go
# of them (see _forget_all_in_child).
_live: weakref.WeakSet[TemplateHandle] = weakref.WeakSet()


@final
@attrs.define(eq=False)
class TemplateHandle(metaclass=NoPublicConstructor):
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
    # The sys.path, directory and environment of a template started by us; None for
    # a copy of this program, whose __main__ is ours (see Template.shares_main).
    _setup: _Setup | None
    _owner: int = attrs.field(factory=os.getpid)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _closed: bool = False
    # An open() found the process gone (it may not have finished exiting yet).
    _broken: bool = False

    def __attrs_post_init__(self) -> None:
        # Non-blocking for every opener: they send on duplicates, which share it.
        self._requests.setblocking(False)
        _live.add(self)
        atexit.register(self._close_at_exit)

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
                await template._invoke(align, *setup)
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
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await anyio.wait_readable(reaped_read)
            os.close(reaped_read)
            raise
        template = Template._create(
            Channel(Transport(ours), ""),
            pid,
            pidfd,
            None,
            None,
            reaped=reaped_read,
            shares_main=self._setup is None,
        )
        async with template._serving():
            yield template

    def _check_ready(self, ready: _wire.Frame | None) -> tuple[int, int]:
        if ready is None:
            self._broken = True
            raise BrokenTemplateError(f"the process of {self!r} has died")
        if ready.op == _wire.ERROR:
            raise remote_error(ready)
        if ready.op != _wire.READY or len(ready.fds) != 1:
            _wire.close_all(ready.fds)
            raise BrokenTemplateError(f"{self!r} answered a fork request with {ready.op}")
        return check_ready(ready, repr(self)), ready.fds[0]

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
        signal_pidfd(self._pidfd, signal.SIGTERM)
        if not readable(self._pidfd, CLOSE_TIMEOUT):
            signal_pidfd(self._pidfd, signal.SIGKILL)
        reap(self._pid, self._pidfd, self._process)

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
        return readable(self._pidfd)

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
    return start_handle(module_names(preload, "preload"), python, env, cwd, "template")


def start_handle(
    modules: list[str],
    python: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    kind: str,
) -> TemplateHandle:
    executable = os.fspath(python) if python is not None else sys.executable
    if not executable:
        raise RuntimeError("sys.executable is unknown here: pass python= to start_template")
    setup = _setup_now(env, cwd)
    process, pidfd, channel = launch(executable, env, cwd)
    assert isinstance(channel, socket.socket)
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
    check_fork_is_safe("fork_main_template()")
    ours, theirs = socket.socketpair()
    parent = os.getpid()
    _wire.flush_stdio()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _main_in_fork(theirs.detach(), parent)
    theirs.close()
    try:
        pidfd = os.pidfd_open(pid)
    except BaseException:
        ours.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return _serve_forks("main-program template", pid, pidfd, ours, None, [], sys.executable, None)


def _main_in_fork(fd: int, parent: int) -> NoReturn:
    """Serve ``fd`` as a template in a process just forked from this program, then exit.

    It never returns into the program's code, and never runs its ``atexit`` handlers.
    """
    code = 1
    try:
        # As for a template from open_template: workers must not read the terminal.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        # main() ends it with the program (PR_SET_PDEATHSIG): safe, since the program
        # had one thread, the one that forked it.
        _worker_template.main(_worker_template.Link(socket.socket(fileno=fd)), parent, False)
        code = 0
    except BaseException as exc:
        print_exception(exc, None)
    finally:
        exit_now(code)


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
        reader = _wire.FrameReader()
        ready = _receive_sync(channel, reader)
        if ready is None:
            signal_pidfd(pidfd, signal.SIGKILL)
            code = reap(pid, pidfd, process)
            pidfd = -1
            check_ready(None, f"{kind} ({python})", code)
        check_ready(ready, f"{kind} ({python})")
        if modules:
            _request_sync(channel, reader, _wire.REQUIRE, pickle.dumps(modules))
        _request_sync(channel, reader, _wire.SERVE_FORKS, fds=[served.detach()])
    except BaseException:
        requests.close()
        served.close()
        channel.close()
        if pidfd >= 0:
            signal_pidfd(pidfd, signal.SIGKILL)
            reap(pid, pidfd, process)
        raise
    return TemplateHandle._create(kind, pid, pidfd, channel, requests, process, setup)


def _request_sync(
    sock: socket.socket,
    reader: _wire.FrameReader,
    op: int,
    payload: bytes = b"",
    fds: list[int] | None = None,
) -> None:
    try:
        _wire.send_blocking(sock, _wire.encode(op, 1, payload, fds or []))
    except OSError as exc:
        raise BrokenTemplateError("the template died before it was ready") from exc
    reply = _receive_sync(sock, reader)
    if reply is None:
        raise BrokenTemplateError("the template died before it was ready")
    if reply.op == _wire.ERROR:
        raise remote_error(reply)
    if reply.op != _wire.OK:
        _wire.close_all(reply.fds)
        raise BrokenTemplateError(f"the template answered {reply.op} instead of OK")
    if reply.payload:  # the command left the template with threads
        warnings.warn(reply.payload.decode(), RuntimeWarning, stacklevel=4)


def _receive_sync(sock: socket.socket, reader: _wire.FrameReader) -> _wire.Frame | None:
    try:
        while (frame := reader.next_frame()) is None:
            if not reader.receive(sock):
                return None
    except OSError:
        return None
    return frame


async def _send_request(requests: socket.socket, fds: list[int], handle: TemplateHandle) -> None:
    while True:
        try:
            requests.sendmsg([b"F"], _wire.ancillary(fds))
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


def _forget_all_in_child() -> None:
    # A forked copy of this process must not keep the handles' sockets open (their
    # processes end when their owner's end closes), nor end processes it does not own.
    for handle in list(_live):
        handle._forget()
    _live.clear()


os.register_at_fork(after_in_child=_forget_all_in_child)
