"""Template processes, seen from the parent: starting them, commanding them, ending them."""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, final

import anyio
import attrs
import sniffio
from anyio.abc import UNIXSocketStream

from ._channel import Channel, ExitSlot, kill_pidfd, receive_frame, remote_error, send_frame
from ._child import Child
from ._errors import BrokenTemplateError
from ._protocol import ARGS, ERROR, EVAL, FDS, FORK, REQUIRE, RUN, STARTED, close_all

if TYPE_CHECKING:
    from ._channel import Reply
    from ._handle import TemplateHandle

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Loads the two standard-library-only modules of the template side without
# importing the trio_fork package (and with it trio and anyio), then serves.
_BOOTSTRAP = """\
def _bootstrap():
    import importlib.util, sys
    fd, package_dir, *path = sys.argv[1:]
    del sys.argv[1:]
    sys.path[:] = path
    for name in ("_protocol", "_serve"):
        spec = importlib.util.spec_from_file_location(
            "trio_fork." + name, package_dir + "/" + name + ".py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    del globals()["_bootstrap"]
    module.main(int(fd))
_bootstrap()
"""

_MIN_VERSION = (3, 10)
_CLOSE_TIMEOUT = 5.0

# Set by trio_fork.start_early(): open_template() then forks from it.
_early: TemplateHandle | None = None


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileDescriptorLike = int | _HasFileno
"""A file descriptor, or an object with a ``fileno()`` method such as a file or socket."""


@final
@attrs.define(eq=False, init=False)
class Template:
    """A template process: a pre-initialised Python to fork new processes from.

    Made by :func:`open_template` or :meth:`Template.fork`, never directly. Commands
    run in the template one at a time, in the order they were issued; each call
    returns once its command has run, and raises :exc:`RemoteError` if it failed
    there. A command whose caller is cancelled still runs in the template.
    """

    _channel: Channel
    _pid: int
    _pidfd: int
    _exit: ExitSlot | None
    _process: subprocess.Popen[bytes] | None
    # How the end of a template that is neither our child (``_process``) nor reported
    # on a channel we read (``_exit``) is known: ``_pidfd`` turns readable when it
    # exits, and ``_reaped``, if set, when the fork server that made it has reaped it.
    _reaped: int | None

    @classmethod
    def _create(
        cls,
        channel: Channel,
        pid: int,
        pidfd: int,
        exit: ExitSlot | None,
        process: subprocess.Popen[bytes] | None,
        reaped: int | None = None,
    ) -> Template:
        self = cls.__new__(cls)
        self._channel = channel
        self._pid = pid
        self._pidfd = pidfd
        self._exit = exit
        self._process = process
        self._reaped = reaped
        channel.name = f"template {pid}"
        return self

    def __repr__(self) -> str:
        return f"<trio_fork.Template {self._pid}>"

    @property
    def pid(self) -> int:
        """The template's process id.

        A template from :func:`open_template` is a child of this process, or of the
        early template once :func:`start_early` has run. One from :meth:`fork` is a
        child of the template it was forked from, one from
        :meth:`TemplateHandle.open` a child of the handle's process, and one from
        :func:`adopt_template` a child of whichever process made it. Whoever its parent
        is, the pid stays valid (it cannot be reused) until the block that gave you
        the template ends; signals are sent through a pidfd.
        """
        return self._pid

    async def require(self, *modules: str) -> None:
        """Import ``modules`` in the template, in order.

        Raises:
            RemoteError: An import failed; the modules before it stay imported.
        """
        names = _module_names(modules, "require")
        await self._request(REQUIRE, pickle.dumps(names))

    async def eval(self, code: str, *args: object) -> None:
        """Run ``code`` in the template's ``__main__`` namespace.

        While it runs, ``args`` is bound there to the list of the extra arguments.
        Use it to define functions and state that later children inherit.

        Raises:
            RemoteError: The code raised; whatever it did before that stays done.
        """
        if not isinstance(code, str):
            raise TypeError(f"eval: code must be a str, not {type(code).__name__}")
        await self._request(EVAL, _pickle((code, list(args)), "eval", args))

    async def send_args(self, *args: object) -> None:
        """Queue ``args`` for every process later forked from this template.

        Queued arguments and descriptors are passed to a child's target after its
        socket, in the order they were sent. They must be picklable.
        """
        await self._request(ARGS, _pickle(list(args), "send_args", args))

    async def send_fds(self, *fds: FileDescriptorLike) -> None:
        """Queue copies of file descriptors for every process later forked from here.

        The caller keeps its own descriptors; the template and each child get their
        own copies, which a child's target receives as plain ``int`` descriptors.
        """
        owned = _dup_fds(fds, "send_fds")
        await self._request(FDS, b"", owned)

    @asynccontextmanager
    async def fork(self) -> AsyncIterator[Template]:
        """Fork this template into a new one, to specialise without changing this one.

        The new template inherits this one's imported modules, globals and queued
        arguments and descriptors. Leaving the block ends it and everything it
        started.
        """
        ours, theirs = socket.socketpair()
        try:
            forked = self._channel.command(FORK, fds=[theirs.detach()])
        except BaseException:
            ours.close()
            raise
        channel = Channel(ours, "new template")
        try:
            pid, pidfd, slot = await self._channel.forked(forked)
        except BaseException:
            channel.close()
            raise
        template = Template._create(channel, pid, pidfd, slot, None)
        async with template._serving():
            yield template

    @asynccontextmanager
    async def spawn(
        self,
        target: str | Callable[..., object],
        *args: object,
        fds: Iterable[FileDescriptorLike] = (),
        deliver_cancel: Callable[[Child], Awaitable[object]] | None = None,
    ) -> AsyncIterator[Child]:
        """Fork the template and run ``target`` in the new process.

        The target runs as the main code of the new process. A plain function is
        called as ``target(sock, *queued, *args, *fds)`` where ``sock`` is a blocking
        :class:`socket.socket` connected to :attr:`Child.stream`, ``queued`` are the
        template's queued arguments and descriptors, and ``fds`` arrive as ``int``
        descriptors. An ``async def`` target is run with :func:`anyio.run` on this
        process's backend and gets an :class:`anyio.abc.UNIXSocketStream` instead of
        ``sock``. The child exits 0 when the target returns, 1 with a traceback on
        stderr when it raises, and ``n`` on ``SystemExit(n)``.

        Leaving the block normally closes :attr:`Child.stream` and waits for the
        child to exit. Leaving it by an exception or cancellation kills the child,
        or calls ``deliver_cancel(child)`` to end it some other way, and waits,
        shielded from cancellation, until it has been reaped.

        Args:
            target: ``"package.module:qualname"``, or a callable defined at the top
                level of a module (resolved in the child by module and qualname).
            args: Picklable arguments passed after the queued ones.
            fds: Descriptors (or objects with ``fileno()``) to pass last; the caller
                keeps its own copies.
            deliver_cancel: An async function that ends the child when the block is
                left early; the default sends SIGKILL. If it returns before the child
                has exited, the block still waits for the exit.

        Raises:
            RemoteError: The target could not be resolved or an argument could not
                be unpickled in the child; no process is left.
            BrokenTemplateError: The template died.
        """
        child = await self._start_child(target, args, fds)
        try:
            yield child
            await child.stream.aclose()
            await child.wait()
        except BaseException:
            await child._abort(deliver_cancel)
            raise

    async def export(self) -> socket.socket:
        """Hand this template's control channel over, to adopt it in another process.

        Waits until every command issued so far has been answered, then returns the
        channel's socket. Send it to another process (for example with
        ``child.stream.send_fds``), close your copy, and call :func:`adopt_template`
        there. This :class:`Template` can no longer be used: its methods raise
        :exc:`anyio.ClosedResourceError`.

        The hand-over moves the channel, not the lifetime. The template still ends
        when the block that gave it to you ends, and it also ends as soon as the
        adopter's block ends (the channel reaches end of file), whichever comes
        first.

        Raises:
            RuntimeError: A child or forked template of this template is still
                running: its exit status would be reported to the adopter.
            BrokenTemplateError: The template died.
        """
        return await self._channel.hand_over()

    async def _request(self, op: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        await self._channel.wait(self._channel.command(op, payload, fds or ()))

    async def _start_child(
        self,
        target: str | Callable[..., object],
        args: tuple[object, ...],
        fds: Iterable[FileDescriptorLike],
    ) -> Child:
        name = _target_name(target)
        payload = _pickle((name, sniffio.current_async_library(), list(args)), "spawn", args)
        self._channel.check()
        owned = _dup_fds(fds, "spawn fds")
        try:
            ours, theirs = socket.socketpair()
        except BaseException:
            close_all(owned)
            raise
        forked: Reply | None = None
        try:
            forked = self._channel.command(FORK, fds=[theirs.detach()])
            ours.setblocking(False)
            try:
                sending, owned = owned, []
                await send_frame(ours, RUN, payload, sending)
                started = await receive_frame(ours)
            except OSError:
                # The process is gone or was never made: the FORK reply or the exit
                # status says why.
                started = None
            pid, pidfd, slot = await self._channel.forked(forked)
        except BaseException:
            ours.close()
            close_all(owned)
            if forked is not None:
                self._channel.abandon(forked)
            raise
        if started is not None and started.op == STARTED:
            try:
                stream = await UNIXSocketStream.from_socket(ours)
            except BaseException:
                ours.close()
                await _reap(pid, pidfd, slot)
                raise
            return Child._create(pid, stream, pidfd, slot)
        ours.close()
        code = await _reap(pid, pidfd, slot)
        if started is not None and started.op == ERROR:
            raise remote_error(started)
        raise BrokenTemplateError(
            f"process {pid} forked from {self._channel.name} ended "
            f"({'status' if code is None else code}) before it could run {name}"
        )

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """Serve the channel while the block runs, then end the template."""
        body_error: BaseException | None = None
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._channel.run)
            try:
                yield
            except BaseException as exc:
                # Raised again below, outside the task group, so that it reaches
                # the caller as itself rather than inside an exception group.
                body_error = exc
            finally:
                await self._aclose()
        if body_error is not None:
            raise body_error

    async def _aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            self._channel.close()
            # End of file alone would wait until the template finishes a command it
            # is running; SIGTERM interrupts that, and either way it shuts down.
            self._send_signal(signal.SIGTERM)
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await self._wait_exit()
            if not self._exited():
                self._send_signal(signal.SIGKILL)
                await self._wait_exit()
            os.close(self._pidfd)
            if self._reaped is not None:
                os.close(self._reaped)

    def _send_signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def _exited(self) -> bool:
        if self._process is not None:
            return self._process.returncode is not None
        if self._exit is not None:
            return self._exit.event.is_set()
        return _readable(self._pidfd) and (self._reaped is None or _readable(self._reaped))

    async def _wait_exit(self) -> None:
        if self._exit is not None:
            await self._exit.event.wait()
            if self._exit.code is not None:
                return
        await anyio.wait_readable(self._pidfd)
        if self._process is not None:
            self._process.wait()
        elif self._reaped is not None:
            await anyio.wait_readable(self._reaped)

    async def _handshake(self, ready: Reply, python: str) -> None:
        assert self._process is not None
        try:
            frame = await self._channel.wait(ready)
        except BrokenTemplateError:
            with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._wait_exit()
            raise BrokenTemplateError(
                f"the template ({python}) exited with status {self._process.returncode} "
                "before it was ready (its stderr may say why)"
            ) from None
        _, version = pickle.loads(frame.payload)
        if tuple(version) < _MIN_VERSION:
            raise BrokenTemplateError(
                f"the template runs Python {'.'.join(map(str, version))}; trio_fork needs "
                f"{'.'.join(map(str, _MIN_VERSION))} or later"
            )


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _reap(pid: int, pidfd: int, slot: ExitSlot) -> int | None:
    """Make sure a process that will not run is gone; its exit status if known."""
    with anyio.CancelScope(shield=True):
        kill_pidfd(pidfd)
        await slot.event.wait()
        if slot.code is None:
            await anyio.wait_readable(pidfd)
        os.close(pidfd)
    return slot.code


@asynccontextmanager
async def open_template(
    preload: Iterable[str] = (),
    *,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Template]:
    """Start a template process, and end it and everything it started on exit.

    The template is a fresh interpreter running a small synchronous command server
    that imports only the standard library: no event loop ever runs in it, so it is
    safe to fork. Its ``sys.path`` is this process's, so whatever is importable here
    is importable there. Its stdin is ``/dev/null``; stdout and stderr are this
    process's.

    Args:
        preload: Modules to import in the template before it is handed out.
        python: The interpreter to run (default: :data:`sys.executable`); Python
            3.10 or later.
        env: The template's environment, as in :mod:`subprocess` (default: this
            process's).
        cwd: The template's working directory, as in :mod:`subprocess`.

    After :func:`start_early`, and unless ``python`` is given, the template is forked
    from the early template instead of started: it is the same pristine template,
    with this process's current ``sys.path``, working directory and environment (or
    ``cwd`` and ``env``) applied to it.

    Raises:
        OSError: The interpreter could not be started.
        BrokenTemplateError: The template exited before it was ready.
        RemoteError: A preloaded module failed to import.
    """
    modules = _module_names(preload, "preload")
    early = _early
    if early is not None and python is None and not early.closed:
        async with early._open_aligned(modules, env, cwd) as template:
            yield template
        return
    executable = os.fspath(python) if python is not None else sys.executable
    if not executable:
        raise RuntimeError("sys.executable is unknown here: pass python= to open_template")
    process, ours = _launch(executable, env, cwd)
    channel = Channel(ours, f"template {process.pid}")
    try:
        pidfd = os.pidfd_open(process.pid)
    except BaseException:
        channel.close()
        process.kill()
        process.wait()
        raise
    template = Template._create(channel, process.pid, pidfd, None, process)
    ready = channel.expect()
    async with template._serving():
        await template._handshake(ready, executable)
        if modules:
            await template.require(*modules)
        yield template


def _launch(
    executable: str, env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start a template interpreter; our end of its channel is returned blocking."""
    ours, theirs = socket.socketpair()
    path = [os.path.abspath(entry) for entry in sys.path if isinstance(entry, str)]
    try:
        process = subprocess.Popen(
            [executable, "-c", _BOOTSTRAP, str(theirs.fileno()), _PACKAGE_DIR, *path],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env=env,
            cwd=cwd,
        )
    except OSError as exc:
        ours.close()
        where = f" in {os.fspath(cwd)!r}" if cwd is not None else ""
        raise type(exc)(
            exc.errno, f"cannot start a template with python={executable!r}{where}: {exc.strerror}"
        ) from None
    finally:
        theirs.close()
    return process, ours


def _module_names(modules: Iterable[str], where: str) -> list[str]:
    if isinstance(modules, str):
        raise TypeError(f"{where}: expected module names, got the string {modules!r} (a 1-tuple?)")
    names = list(modules)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: module names are non-empty strings, not {name!r}")
    return names


def _target_name(target: object) -> str:
    if isinstance(target, str):
        module_name, sep, name = target.partition(":")
        if not (sep and module_name and name):
            raise ValueError(f"target {target!r} is not of the form 'package.module:qualname'")
        return target
    if not callable(target):
        raise TypeError(
            f"target must be a 'module:qualname' string or a callable, not {type(target).__name__}"
        )
    module: object = getattr(target, "__module__", None)
    qualname: object = getattr(target, "__qualname__", None)
    owner = getattr(target, "__self__", None)
    bound_to_instance = owner is not None and not isinstance(owner, type) and not _is_module(owner)
    if (
        not isinstance(module, str)
        or not isinstance(qualname, str)
        or "<" in qualname
        or bound_to_instance
    ):
        raise TypeError(
            f"target {target!r} cannot be found by name in another process: pass a "
            "function defined at the top level of a module, or a 'module:qualname' string"
        )
    return f"{module}:{qualname}"


def _is_module(obj: object) -> bool:
    return type(obj) is type(sys)


def _pickle(value: object, where: str, args: tuple[object, ...] | list[object]) -> bytes:
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for index, arg in enumerate(args):
            try:
                pickle.dumps(arg, pickle.HIGHEST_PROTOCOL)
            except Exception as arg_exc:
                raise TypeError(
                    f"{where}: argument {index} ({type(arg).__name__}) cannot be pickled: {arg_exc}"
                ) from arg_exc
        raise TypeError(f"{where}: cannot pickle the arguments: {exc}") from exc


def _dup_fds(fds: Iterable[FileDescriptorLike], where: str) -> list[int]:
    if isinstance(fds, (int, str, bytes)) or hasattr(fds, "fileno"):
        raise TypeError(f"{where}: expected a sequence of descriptors, got {fds!r}")
    owned: list[int] = []
    try:
        for index, obj in enumerate(fds):
            owned.append(_dup(obj, where, index))
    except BaseException:
        close_all(owned)
        raise
    return owned


def _dup(obj: Any, where: str, index: int) -> int:
    if isinstance(obj, bool) or not (isinstance(obj, int) or hasattr(obj, "fileno")):
        raise TypeError(
            f"{where}: item {index} ({type(obj).__name__}) is neither a file descriptor "
            "nor an object with fileno()"
        )
    try:
        fd = obj if isinstance(obj, int) else obj.fileno()
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"fileno() returned {fd!r}")
        return os.dup(fd)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: item {index} ({obj!r}) is not an open file descriptor") from exc
