"""Template processes, seen from the parent: commanding them, forking them, ending them."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import final

import anyio
import attrs
import sniffio

from . import _exec
from ._arguments import FileDescriptorLike, dup_fds, module_names, pickle_arguments
from ._channel import Channel, ExitSlot, Reply
from ._child import Child, Process
from ._construct import NoPublicConstructor
from ._errors import BrokenTemplateError
from ._process import CLOSE_TIMEOUT, check_ready, readable, signal_pidfd
from ._spawn import Spawner, Spawning, current_event_loop
from ._transport import Transport
from .worker import _buffers, _wire


@final
@attrs.define(eq=False)
class Template(Spawner, metaclass=NoPublicConstructor):
    """A template process: a pre-initialised Python to fork new processes from.

    Made by :func:`open_template` or :meth:`Template.fork`, never directly, and
    usable until the block that made it ends.

    Commands run in the template one at a time, in the order they were issued, even
    from several tasks; a long command delays the ones behind it. Each call returns
    once its command has run, and raises :exc:`RemoteError` if it failed there. A
    command whose caller is cancelled has already been sent: it still runs in the
    template, and its result is discarded.

    Every method raises :exc:`BrokenTemplateError` once the template has died, and
    :exc:`anyio.ClosedResourceError` once its block has ended. A template belongs to
    the event loop that opened it: every method raises :exc:`RuntimeError` when
    called from another one (in another thread, say; from a worker thread of its
    own event loop, call it with :func:`anyio.from_thread.run`).
    """

    _channel: Channel
    _pid: int
    _pidfd: int
    # How its end is known: ``_process`` when it is our child; ``_exit`` when it is
    # reported on a channel we read; else ``_pidfd`` turns readable when it exits,
    # and ``_reaped``, if set, when the fork server that made it has reaped it.
    _exit: ExitSlot | None
    _process: subprocess.Popen[bytes] | None
    _reaped: int | None = None
    # Whether the template's __main__ is this program's, so that functions defined in
    # this program's __main__ can be found there by name.
    shares_main: bool = False
    # spawn() and fork() blocks open, or starting, on this template: export() refuses
    # while any is.
    _blocks: int = 0
    # The event loop that opened it, and its thread: the only ones it may be used from.
    _loop: object = attrs.field(init=False, factory=lambda: current_event_loop())
    _thread: str = attrs.field(init=False, factory=lambda: threading.current_thread().name)

    def __attrs_post_init__(self) -> None:
        self._channel.name = f"template {self._pid}"

    def __repr__(self) -> str:
        return f"<trio_fork.Template {self._pid}>"

    @property
    def pid(self) -> int:
        """The template's process id.

        A template from :func:`open_template` is a child of the process-wide default
        template, or of the early template once :func:`start_early` has run, or of
        this process if it started an interpreter of its own (``fresh=True``). One
        from :meth:`fork` is a child of the template it was forked from, one from
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
        self._check_loop()
        names = module_names(modules, "require")
        await self._request(_wire.REQUIRE, pickle.dumps(names))

    async def eval(self, code: str, *args: object) -> None:
        """Run ``code`` in the template's ``__main__`` namespace.

        Use it to define functions and state that every process forked from the
        template afterwards inherits. A function defined here is the target
        ``"__main__:name"`` of :meth:`spawn`. Tracebacks show the code's source.
        Code run here may call the child-side API of :mod:`trio_fork.worker`.

        Args:
            code: Python source, run with :func:`exec`.
            args: Picklable values; while ``code`` runs, the global name ``args``
                is bound to a list of them (and is removed afterwards).

        Raises:
            TypeError: ``code`` is not a string, or an argument cannot be pickled.
            RemoteError: The code raised (or is not valid Python); whatever it did
                before that stays done.
        """
        self._check_loop()
        if not isinstance(code, str):
            raise TypeError(f"eval: code must be a str, not {type(code).__name__}")
        await self._request(_wire.EVAL, pickle_arguments((code, list(args)), "eval", args))

    async def send_args(self, *args: object) -> None:
        """Queue ``args`` for every process later forked from this template.

        Queued arguments and descriptors form one queue, in the order they were
        sent. A child's target gets them after its socket and before the arguments
        given to :meth:`spawn`; a template made by :meth:`fork` starts with a copy
        of the queue. Processes already forked are not affected.

        Args:
            args: Picklable values, unpickled in the template when they arrive.
                Their big buffers travel in shared memory, as a call's arguments do
                (see :doc:`large-data`); processes forked from the template share
                those pages until they write to them.

        Raises:
            TypeError: An argument cannot be pickled (the message names it).
            RemoteError: An argument cannot be unpickled in the template.
        """
        self._check_loop()
        payload, fds = self._serialize(list(args), "send_args", args)
        await self._request(_wire.ARGS, payload, fds)

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
            TypeError: An item is neither a descriptor nor has ``fileno()``, or the
                template's channel cannot carry descriptors.
            ValueError: A descriptor is not open.
        """
        self._check_loop()
        self._channel_fds_check(fds)
        owned = dup_fds(fds, "send_fds")
        await self._request(_wire.FDS, b"", owned)

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
        self._check_loop()
        self._channel_fds_check([0])
        self._blocks += 1
        try:
            ours, theirs = socket.socketpair()
            try:
                forked = self._channel.command(_wire.FORK, fds=[theirs.detach()])
            except BaseException:
                ours.close()
                raise
            channel = Channel(Transport(ours), "new template")
            try:
                pid, pidfd, slot = await self._channel.forked(forked)
            except BaseException:
                # It ends when it sees our end closed, or is killed when its pidfd arrives.
                channel.close()
                assert forked.slot is not None
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await forked.slot.event.wait()
                raise
            template = Template._create(
                channel, pid, pidfd, slot, None, shares_main=self.shares_main
            )
            async with template._serving():
                yield template
        finally:
            self._blocks -= 1

    def spawn(
        self,
        target: str | Callable[..., object],
        *args: object,
        fds: Iterable[FileDescriptorLike] = (),
        deliver_cancel: Callable[[Child], Awaitable[object]] | None = None,
    ) -> AbstractAsyncContextManager[Child]:
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
        child to exit. Leaving it by an exception or cancellation kills the child
        (or calls ``deliver_cancel(child)`` to end it some other way), waits,
        shielded from cancellation, until it is gone, then closes the stream, and
        lets the exception propagate as itself. The wait is bounded: the child's
        death is known from its pidfd, and its template's report of the exit status
        is awaited only a moment more (a busy or stopped template reports later,
        into :attr:`Child.returncode`).

        If the spawn itself is cancelled, before the block is entered, no process is
        left: the child, if the template made one, is killed, before this process
        closes its end of the child's socket, and the cancellation propagates once
        it is gone (or after 5 seconds if its template does not answer; the
        template kills it as soon as it reads the command). Its target may have
        begun to run, since a child runs it without waiting for this process; it
        never sees its socket closed because of the cancellation. Nothing is
        printed.

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
        return self._spawn(target, args, fds, deliver_cancel)

    # AnyEvent::Fork's "faster fork+exec": a program run from the template (see ._exec).
    open_process = _exec.open_process
    run_process = _exec.run_process

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
                open or starting: the exit status of its process would go to the
                adopter.
            BrokenTemplateError: The template died.
        """
        self._check_loop()
        if self._blocks:
            raise RuntimeError(
                f"{self!r} has {self._blocks} spawn() or fork() block(s) open: leave them "
                "before exporting it"
            )
        return await self._channel.hand_over()

    def _channel_fds_check(self, fds: object) -> None:
        if fds and not self._channel.carries_fds:
            raise TypeError(
                f"{self!r} is reached over a byte stream (such as an ssh connection), "
                "which cannot carry file descriptors"
            )

    def _serialize(
        self, value: object, where: str, args: tuple[object, ...] | list[object]
    ) -> tuple[bytes, list[int]]:
        """``value`` pickled for a command, its big buffers out of band if fds can go."""
        if not self._channel.carries_fds:
            return pickle_arguments(value, where, args), []
        try:
            return _buffers.dumps(value)
        except Exception:
            pickle_arguments(value, where, args)  # raises, naming the argument at fault
            raise

    async def _invoke(self, function: Callable[..., object], *args: object) -> None:
        """Call a function of the worker side in the template (see ``INVOKE``)."""
        self._check_loop()
        await self._request(_wire.INVOKE, pickle.dumps((function, args), pickle.HIGHEST_PROTOCOL))

    async def _request(self, op: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        reply = await self._channel.wait(self._channel.command(op, payload, fds or ()))
        if reply.payload:  # the command left the template with threads (see Server.handle)
            warnings.warn(reply.payload.decode(), RuntimeWarning, stacklevel=3)

    def _check(self) -> None:
        self._channel.check()

    def _send_spawn(
        self, name: str, args: tuple[object, ...], fds: Iterable[FileDescriptorLike]
    ) -> Spawning:
        self._channel.check()
        self._channel_fds_check([0])
        payload, buffers = self._serialize(
            (name, sniffio.current_async_library(), list(args)), "spawn", args
        )
        try:
            owned = dup_fds(fds, "spawn fds")
        except BaseException:
            _wire.close_all(buffers)
            raise
        try:
            ours, theirs = socket.socketpair()
        except BaseException:
            _wire.close_all([*owned, *buffers])
            raise
        # The child confirms with its pid and a pidfd of itself. The descriptors of
        # the arguments' buffers come last (see _buffers.take).
        id, slot = self._channel.spawn(payload, [theirs.detach(), *owned, *buffers])

        def process_of(started: _wire.Frame) -> Process | None:
            if started.op != _wire.STARTED or len(started.fds) != 1:
                return None
            (pid,) = _wire.PID.unpack(started.payload)
            return Process(pid, started.fds[0], slot)

        return Spawning(id, slot, ours, process_of)

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
            signal_pidfd(self._pidfd, signal.SIGTERM)
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await self._wait_exit()
            if not self._exited():
                signal_pidfd(self._pidfd, signal.SIGKILL)
                await self._wait_exit()
            os.close(self._pidfd)
            if self._reaped is not None:
                os.close(self._reaped)

    def _exited(self) -> bool:
        if self._process is not None:
            return self._process.returncode is not None
        if self._exit is not None:
            return self._exit.event.is_set()
        return readable(self._pidfd) and (self._reaped is None or readable(self._reaped))

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
        """Wait for the READY of a template we started."""
        assert self._process is not None
        try:
            frame: _wire.Frame | None = await self._channel.wait(ready)
        except BrokenTemplateError:
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._wait_exit()
            frame = None
        try:
            check_ready(frame, f"template ({python})", self._process.returncode)
        except BrokenTemplateError as exc:
            raise BrokenTemplateError(str(exc)) from None
