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

from ._channel import Channel, ExitSlot, kill_pidfd, receive_frame, remote_error
from ._child import Child
from ._errors import BrokenTemplateError
from ._protocol import ARGS, ERROR, EVAL, FDS, FORK, PID, REQUIRE, STARTED, close_all

if TYPE_CHECKING:
    from ._channel import Reply
    from ._handle import TemplateHandle

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Loads the two standard-library-only modules of the template side without
# importing the trio_fork package (and with it trio and anyio), then serves.
_BOOTSTRAP = """\
def _bootstrap():
    import sys
    fd, owner, sigint_blocked, package_dir, *path = sys.argv[1:]
    del sys.argv[1:]
    sys.path[:] = path
    for name in ("_protocol", "_serve"):
        filename = package_dir + "/" + name + ".py"
        module = type(sys)("trio_fork." + name)
        module.__file__ = filename
        sys.modules[module.__name__] = module
        with open(filename, "rb") as file:
            exec(compile(file.read(), filename, "exec"), module.__dict__)
    del globals()["_bootstrap"]
    module.main(int(fd), int(owner), sigint_blocked == "1")
_bootstrap()
"""

_CLOSE_TIMEOUT = 5.0
_PYTHON_VERSION = tuple(sys.version_info[:2])

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

    Made by :func:`open_template` or :meth:`Template.fork`, never directly, and
    usable until the block that made it ends.

    Commands run in the template one at a time, in the order they were issued, even
    from several tasks; a long command delays the ones behind it. Each call returns
    once its command has run, and raises :exc:`RemoteError` if it failed there. A
    command whose caller is cancelled has already been sent: it still runs in the
    template, and its result is discarded.

    Every method raises :exc:`BrokenTemplateError` once the template has died, and
    :exc:`anyio.ClosedResourceError` once its block has ended.
    """

    _channel: Channel
    _pid: int
    _pidfd: int
    _exit: ExitSlot | None
    _process: subprocess.Popen[bytes] | None
    # Whether the template's __main__ is this program's, so that functions defined in
    # this program's __main__ can be found there by name.
    _shares_main: bool
    # How the end of a template that is neither our child (``_process``) nor reported
    # on a channel we read (``_exit``) is known: ``_pidfd`` turns readable when it
    # exits, and ``_reaped``, if set, when the fork server that made it has reaped it.
    _reaped: int | None
    # spawn() and fork() blocks open on this template: export() refuses while any is.
    _blocks: int

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
        self._shares_main = False
        self._reaped = reaped
        self._blocks = 0
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
        :meth:`TemplateHandle.open` a child of the handle's template, and one from
        :func:`adopt_template` a child of whichever process made it. Whatever its
        parent, the pid names this template until the block that gave it to you
        ends (it cannot be reused before), and signals reach it through a pidfd.
        """
        return self._pid

    async def require(self, *modules: str) -> None:
        """Import ``modules`` in the template, in order.

        Every process forked from the template afterwards has them imported. This
        binds no name in the template's ``__main__``: code run there with
        :meth:`eval` still says ``import name`` (at no cost, the module is loaded).

        Args:
            modules: Absolute module names, such as ``"json"`` or ``"mypkg.workers"``.

        Raises:
            TypeError: A name is not a non-empty string.
            RemoteError: An import failed; the modules before it stay imported.
        """
        names = module_names(modules, "require")
        await self._request(REQUIRE, pickle.dumps(names))

    async def eval(self, code: str, *args: object) -> None:
        """Run ``code`` in the template's ``__main__`` namespace.

        Use it to define functions and state that every process forked from the
        template afterwards inherits. A function defined here is the target
        ``"__main__:name"`` of :meth:`spawn`. Tracebacks show the code's source.

        Args:
            code: Python source, run with :func:`exec`.
            args: Picklable values; while ``code`` runs, the global name ``args``
                is bound to a list of them (and is removed afterwards).

        Raises:
            TypeError: ``code`` is not a string, or an argument cannot be pickled.
            RemoteError: The code raised (or is not valid Python); whatever it did
                before that stays done.
        """
        if not isinstance(code, str):
            raise TypeError(f"eval: code must be a str, not {type(code).__name__}")
        await self._request(EVAL, _pickle((code, list(args)), "eval", args))

    async def send_args(self, *args: object) -> None:
        """Queue ``args`` for every process later forked from this template.

        Queued arguments and descriptors form one queue, in the order they were
        sent. A child's target gets them after its socket and before the arguments
        given to :meth:`spawn`; a template made by :meth:`fork` starts with a copy
        of the queue. Processes already forked are not affected.

        Args:
            args: Picklable values, unpickled in the template when they arrive.

        Raises:
            TypeError: An argument cannot be pickled (the message names it).
            RemoteError: An argument cannot be unpickled in the template.
        """
        await self._request(ARGS, _pickle(list(args), "send_args", args))

    async def send_fds(self, *fds: FileDescriptorLike) -> None:
        """Queue copies of file descriptors for every process later forked from here.

        They join the queue of :meth:`send_args`, in the order sent. Each is
        duplicated at the call, so the caller keeps its own and may close it as soon
        as the call returns; the template and each child get copies of their own,
        which a child's target receives as plain ``int`` descriptors that it owns.

        Args:
            fds (FileDescriptorLike): File descriptors, or objects with a
                ``fileno()`` method such as files and sockets.

        Raises:
            TypeError: An item is neither a descriptor nor has ``fileno()``.
            ValueError: A descriptor is not open.
        """
        owned = _dup_fds(fds, "send_fds")
        await self._request(FDS, b"", owned)

    @asynccontextmanager
    async def fork(self) -> AsyncIterator[Template]:
        """Fork this template into a new one, to specialise without changing this one.

        Use as ``async with template.fork() as forked:``. The new template starts
        with this one's imported modules, the globals of its ``__main__`` and its
        queue of arguments and descriptors, and is independent from then on. It is
        a child of this template, not of this process.

        Leaving the block, however it is left, ends the new template and everything
        it started. It also ends, earlier, if this template ends.

        Yields:
            Template: The new template.

        Raises:
            BrokenTemplateError: This template died.
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
            # It ends when it sees our end closed, or is killed when its pidfd arrives.
            channel.close()
            assert forked.slot is not None
            await _gone(forked.slot)
            raise
        template = Template._create(channel, pid, pidfd, slot, None)
        template._shares_main = self._shares_main
        self._blocks += 1
        try:
            async with template._serving():
                yield template
        finally:
            self._blocks -= 1

    @asynccontextmanager
    async def spawn(
        self,
        target: str | Callable[..., object],
        *args: object,
        fds: Iterable[FileDescriptorLike] = (),
        deliver_cancel: Callable[[Child], Awaitable[object]] | None = None,
    ) -> AsyncIterator[Child]:
        """Fork the template and run ``target`` in the new process.

        Use as ``async with template.spawn(target, ...) as child:``. Many tasks may
        spawn from one template at once.

        The target runs as the main code of the new process. A plain function is
        called as ``target(sock, *queued, *args, *fds)`` where ``sock`` is a blocking
        :class:`socket.socket` connected to :attr:`Child.stream`, ``queued`` are the
        template's queued arguments and descriptors, and ``fds`` arrive as ``int``
        descriptors. An ``async def`` target is run with :func:`anyio.run` on this
        process's backend and gets an :class:`anyio.abc.UNIXSocketStream` instead of
        ``sock``. The child exits 0 when the target returns, 1 with a traceback on
        stderr when it raises, and ``n`` on ``SystemExit(n)``; it starts with the
        signal handling of a fresh Python program.

        Leaving the block normally closes :attr:`Child.stream` (a child still
        writing to its socket then gets :exc:`BrokenPipeError`) and waits for the
        child to exit. Leaving it by an exception or cancellation closes the stream
        and kills the child (or calls ``deliver_cancel(child)`` to end it some
        other way), waits, shielded from cancellation, until it has been reaped,
        and lets the exception propagate as itself.

        Args:
            target: ``"package.module:qualname"``, or a callable defined at the top
                level of a module (resolved in the child by module and qualname).
            args: Picklable arguments passed after the queued ones.
            fds (Iterable[FileDescriptorLike]): Descriptors (or objects with
                ``fileno()``) to pass last; the caller keeps its own copies.
            deliver_cancel: An async function that ends the child when the block is
                left early; the default sends SIGKILL. It runs while the block waits
                for the exit, and is cancelled once the child has exited; if it
                returns first, the block still waits. If it raises, the child is
                killed and its exception propagates.

        Yields:
            Child: The running child.

        Raises:
            TypeError: ``target`` has no name another process can look up (a
                lambda, a nested function, a bound method), an argument cannot be
                pickled, or ``fds`` is not a sequence of descriptors.
            ValueError: ``target`` is a string not of the form ``"module:qualname"``,
                or a descriptor is not open.
            RemoteError: The target could not be resolved or an argument could not
                be unpickled in the child; no process is left.
            BrokenTemplateError: The template died.
        """
        child = await self._start_child(target, args, fds)
        self._blocks += 1
        try:
            yield child
            await child.stream.aclose()
            await child.wait()
        except BaseException:
            await child._abort(deliver_cancel)
            raise
        finally:
            self._blocks -= 1

    async def export(self) -> socket.socket:
        """Hand this template's control channel over, to adopt it in another process.

        Python's counterpart of AnyEvent::Fork's ``to_fh``. Waits until every command
        issued so far has been answered, then returns the channel's socket. Send it
        to another process (for example with ``child.stream.send_fds``), close your
        copy, and call :func:`adopt_template` there. From then on this
        :class:`Template` raises :exc:`anyio.ClosedResourceError`.

        The hand-over moves the channel, not the lifetime: the template still ends
        when the block that gave it to you ends. It also ends as soon as the
        adopter's block ends (its channel reaches end of file), whichever comes
        first.

        Raises:
            RuntimeError: A :meth:`spawn` or :meth:`fork` block of this template is
                still open: the exit status of its process would go to the adopter.
            BrokenTemplateError: The template died.
        """
        if self._blocks:
            raise RuntimeError(
                f"{self!r} has {self._blocks} spawn() or fork() block(s) open: leave them "
                "before exporting it"
            )
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
        if not isinstance(target, str) and name.startswith("__main__:") and not self._shares_main:
            raise TypeError(
                f"target {target!r} is defined in this program's __main__, which the "
                f"template does not have: move it to a module, or define it in the template "
                f"with eval() and pass the string {name!r}"
            )
        payload = _pickle((name, sniffio.current_async_library(), list(args)), "spawn", args)
        self._channel.check()
        owned = _dup_fds(fds, "spawn fds")
        try:
            ours, theirs = socket.socketpair()
        except BaseException:
            close_all(owned)
            raise
        # One command does it all: the template forks and the child runs at once. The
        # child confirms on its own socket, with its pid and a pidfd of itself.
        seq, slot = self._channel.spawn(payload, [theirs.detach(), *owned])
        try:
            ours.setblocking(False)
            try:
                started = await receive_frame(ours)
            except OSError:
                started = None  # the slot says what became of the child
        except BaseException:
            ours.close()
            self._channel.kill(seq)
            await _gone(slot)
            raise
        if started is not None and started.op == STARTED and not started.fds_lost:
            (pid,) = PID.unpack(started.payload)
            pidfd = started.fds[0]
            try:
                stream = await UNIXSocketStream.from_socket(ours)
            except BaseException:
                ours.close()
                await _reap(pidfd, slot)
                raise
            return Child._create(pid, stream, pidfd, slot)
        ours.close()
        if started is not None:
            close_all(started.fds)
        # It will not run, or must not without a pidfd: wait until it is gone (or was
        # never made) before saying why.
        self._channel.kill(seq)
        with anyio.CancelScope(shield=True):
            await slot.event.wait()
        if slot.error is not None:
            raise slot.error
        if started is not None and started.op == ERROR:
            raise remote_error(started)
        if started is not None and started.fds_lost:
            raise OSError(
                "the pidfd of a new child was lost in transit: the kernel truncated the "
                "control message (is RLIMIT_NOFILE too low?); the child was killed"
            )
        if slot.code is None:
            self._channel.check()
        raise BrokenTemplateError(
            f"a process forked from {self._channel.name} ended with status {slot.code} "
            f"before it could run {name}"
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
        if tuple(version[:2]) != _PYTHON_VERSION:
            # It imports from our sys.path, compiled extensions included.
            theirs = ".".join(map(str, version[:2]))
            ours = ".".join(map(str, _PYTHON_VERSION))
            raise BrokenTemplateError(
                f"the template ({python}) runs Python {theirs} but this process runs "
                f"{ours}: a template imports from this process's sys.path, so it must "
                "run the same Python version"
            )


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _gone(slot: ExitSlot) -> None:
    """After a start was abandoned: wait, shielded, until the process is reaped.

    Bounded, because the report comes from the template, and a template stuck in a
    long command only reports when it ends; leaving the template's block takes the
    process down then.
    """
    with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
        await slot.event.wait()


async def _reap(pidfd: int, slot: ExitSlot) -> None:
    """Kill a child that will not be handed out, and wait until it is gone."""
    with anyio.CancelScope(shield=True):
        kill_pidfd(pidfd)
        await slot.event.wait()
        if slot.code is None:
            await anyio.wait_readable(pidfd)
        os.close(pidfd)


@asynccontextmanager
async def open_template(
    preload: Iterable[str] = (),
    *,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Template]:
    """Start a template process, and end it and everything it started on exit.

    Use as ``async with open_template(...) as template:``.

    The template is a fresh interpreter running a small synchronous command server
    that imports only the standard library: no event loop ever runs in it, so it is
    safe to fork. Its ``sys.path`` is this process's, so whatever is importable here
    is importable there. Its stdin is ``/dev/null``; stdout and stderr are this
    process's; it inherits no other descriptor. It ignores SIGINT.

    Leaving the block, however it is left, closes the template's socket and sends
    it SIGTERM; the template kills and reaps every process below it, then exits (or
    is killed if it has not exited after a few seconds). The block waits for that,
    shielded from cancellation.

    Args:
        preload: Modules to import in the template before it is handed out.
        python: The interpreter to run (default: :data:`sys.executable`). It must
            run this process's Python version (major.minor), since the template
            imports from this process's ``sys.path``.
        env: The template's environment, as in :mod:`subprocess` (default: this
            process's).
        cwd: The template's working directory, as in :mod:`subprocess`.

    After :func:`start_early`, unless ``python`` is given, the template is forked
    from the early template instead of started: the same pristine template, with
    this process's current ``sys.path``, working directory and environment (or
    ``cwd`` and ``env``) applied to it. It is then a child of the early template.

    Yields:
        Template: The ready template, with ``preload`` imported.

    Raises:
        TypeError: ``preload`` is a string rather than a sequence of module names.
        OSError: The interpreter could not be started (for instance
            :exc:`FileNotFoundError` for a missing interpreter or ``cwd``).
        BrokenTemplateError: The template exited before it was ready, or runs
            another Python version.
        RemoteError: A preloaded module failed to import.
    """
    modules = module_names(preload, "preload")
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
    ready = channel.expect_ready()
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
    # The template inherits this signal mask: a Ctrl-C during its start-up stays
    # pending until it ignores SIGINT, instead of printing a traceback there.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sigint_blocked = "0" if signal.SIGINT in mask else "1"
    try:
        process = subprocess.Popen(
            [
                executable,
                "-c",
                _BOOTSTRAP,
                str(theirs.fileno()),
                str(os.getpid()),
                sigint_blocked,
                _PACKAGE_DIR,
                *path,
            ],
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
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
    return process, ours


def module_names(modules: Iterable[str], where: str) -> list[str]:
    if isinstance(modules, str):
        raise TypeError(f"{where}: expected module names, got the string {modules!r} (a 1-tuple?)")
    names = list(modules)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: module names are non-empty strings, not {name!r}")
    return names


def check_name(name: str, what: str) -> str:
    """``name`` if it is of the form ``"package.module:qualname"``, else ValueError."""
    module_name, sep, qualname = name.partition(":")
    if not (sep and module_name and qualname):
        raise ValueError(f"{what} {name!r} is not of the form 'package.module:qualname'")
    return name


def _target_name(target: object) -> str:
    if isinstance(target, str):
        return check_name(target, "target")
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
