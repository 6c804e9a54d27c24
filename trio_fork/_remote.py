"""Remote templates: the template API on another host, over ssh or any byte stream.

A remote template is an ordinary template (:mod:`trio_fork.worker._template`) forked
on the other host by a relay (:mod:`trio_fork.worker._relay`) that the transport
command started there from sources sent down the stream: nothing of trio_fork is
installed there. The relay multiplexes the one stream, and this side bridges each of
its streams to a local socket (:mod:`._mux`), so that a remote template's channel is
a :class:`~trio_fork._channel.Channel` and a remote child's stream a
:class:`~anyio.abc.UNIXSocketStream`, as for a local template.
"""

from __future__ import annotations

import marshal
import os
import pickle
import shlex
import signal
import socket
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import final

import anyio
import attrs
import sniffio
from anyio.abc import UNIXSocketStream

from . import _forwarding
from ._arguments import FileDescriptorLike, module_names, pickle_arguments
from ._channel import Channel, ExitSlot
from ._child import Child, Process
from ._construct import NoPublicConstructor
from ._errors import BrokenTemplateError
from ._mux import Mux
from ._process import BOOTSTRAP, CLOSE_TIMEOUT, worker_sources
from ._remote_child import NO_FDS, RemoteChildStream, RemoteProcess
from ._spawn import Spawner, Spawning, current_event_loop
from ._transport import Transport
from .worker import _relay, _wire

MINIMUM_PYTHON = (3, 11)
_MARKER = b"trio_fork-python "
# Run by the remote Python first, whatever its version: it says which it is, then
# (if it will do) reads the bootstrap from stdin and runs it. Python 2 parses it too.
_STAGE1 = (
    (
        "import os,sys\n"
        "v=sys.version_info[:2]\n"
        "os.write(1,('\\nMARKER%d.%d\\n'%v).encode())\n"
        "if v<MINIMUM:sys.exit(0)\n"
        "def r(n):\n"
        " b=b''\n"
        " while len(b)<n:\n"
        "  c=os.read(0,n-len(b))\n"
        "  if not c:sys.exit(1)\n"
        "  b+=c\n"
        " return b\n"
        "exec(r(int(r(8))))\n"
    )
    .replace("MARKER", _MARKER.decode())
    .replace("MINIMUM", repr(MINIMUM_PYTHON))
)


def transport_command(destination: str | Sequence[str]) -> tuple[list[str], str]:
    """The command that reaches a shell there (``sh`` appended), and a name for messages.

    ``sh`` reads the start-up line from stdin: that works whatever the login shell,
    and with transports that run a program without a shell (``docker exec``).
    """
    if isinstance(destination, str):
        if not destination or destination.startswith("-"):
            raise ValueError(f"destination: {destination!r} is not an ssh destination")
        return ["ssh", "-T", "-o", "BatchMode=yes", destination, "sh"], destination
    command = list(destination)
    if not command or not all(isinstance(word, str) and word for word in command):
        raise TypeError(
            f"destination: expected an ssh destination or a command (a sequence of "
            f"non-empty strings), got {destination!r}"
        )
    return [*command, "sh"], shlex.join(command)


@final
@attrs.define(eq=False)
class RemoteTemplate(Spawner, metaclass=NoPublicConstructor):
    """A template process on another host, reached over a byte stream (ssh).

    Made by :func:`open_remote_template` or :meth:`RemoteTemplate.fork`, never
    directly. It has the methods of a local :class:`Template` that make sense across
    hosts, with the same semantics; :func:`open_rpc` and :func:`open_pool` take it as
    they take a local one. File descriptors cannot cross hosts: :meth:`send_fds`, and
    :meth:`spawn` with ``fds``, raise :exc:`TypeError`.

    Every method raises :exc:`BrokenTemplateError` once the template has died or the
    connection is lost (the message says which), and :exc:`anyio.ClosedResourceError`
    once its block has ended.
    """

    _mux: Mux
    _channel: Channel
    _stream: int
    _pid: int
    host: str
    # A forked template's end is reported by the template it was forked from.
    _exit: ExitSlot | None = None
    shares_main: bool = False
    _blocks: int = 0
    _loop: object = attrs.field(init=False, factory=lambda: current_event_loop())
    _thread: str = attrs.field(init=False, factory=lambda: threading.current_thread().name)
    _main_owner = "a remote template"

    def __attrs_post_init__(self) -> None:
        self._channel.name = f"remote template {self._pid} on {self.host}"

    def __repr__(self) -> str:
        return f"<trio_fork.RemoteTemplate {self._pid} on {self.host}>"

    @property
    def pid(self) -> int:
        """The template's process id on its host."""
        return self._pid

    async def require(self, *modules: str) -> None:
        """Import ``modules`` in the template, in order; see :meth:`Template.require`.

        A module the other host lacks is imported from this process's source, if
        import forwarding is on (see :func:`open_remote_template`).
        """
        self._check_loop()
        names = module_names(modules, "require")
        await self._request(_wire.REQUIRE, pickle.dumps(names))

    async def eval(self, code: str, *args: object) -> None:
        """Run ``code`` in the template's ``__main__``; see :meth:`Template.eval`."""
        self._check_loop()
        if not isinstance(code, str):
            raise TypeError(f"eval: code must be a str, not {type(code).__name__}")
        await self._request(_wire.EVAL, pickle_arguments((code, list(args)), "eval", args))

    async def send_args(self, *args: object) -> None:
        """Queue ``args`` for every process later forked; see :meth:`Template.send_args`."""
        self._check_loop()
        await self._request(_wire.ARGS, pickle_arguments(list(args), "send_args", args))

    async def send_fds(self, *fds: FileDescriptorLike) -> None:
        """Refused: file descriptors cannot cross hosts.

        Raises:
            TypeError: Always.
        """
        raise TypeError(NO_FDS)

    @asynccontextmanager
    async def fork(self) -> AsyncIterator[RemoteTemplate]:
        """Fork this template into a new one on its host; see :meth:`Template.fork`."""
        self._check_loop()
        self._check()
        stream, sock = self._mux.open_stream()
        self._mux.expect(self._stream, stream)
        try:
            reply = self._channel.command(_wire.FORK)
        except BaseException:
            sock.close()
            raise
        assert reply.slot is not None
        channel = Channel(Transport(sock), "new remote template")
        try:
            frame = await self._translate(self._channel.wait(reply))
            (pid,) = _wire.PID.unpack(frame.payload)
        except BaseException:
            # Its channel's end is the relay's cue to close it: it ends.
            channel.close()
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await reply.slot.event.wait()
            raise
        template = RemoteTemplate._create(self._mux, channel, stream, pid, self.host, reply.slot)
        self._blocks += 1
        try:
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
        """Fork the template and run ``target`` there; see :meth:`Template.spawn`.

        The same code as a local template's, with the same guarantees under
        cancellation and errors. The child's :attr:`~Child.stream` is a local socket
        bridged to the child's over the connection, which carries bytes only: its
        ``send_fds`` and ``receive_fds`` raise :exc:`TypeError` (no descriptor is
        dropped silently).
        Its :attr:`~Child.pid` is the pid on the other host, and signals reach it
        through the relay there, which holds its pidfd. Leaving the block by an
        exception or cancellation kills the child there and waits for its
        template's report, bounded: a template too busy (or stopped) to report is
        trusted with the kill after 5 seconds.

        Raises:
            TypeError: ``fds`` is not empty: descriptors cannot cross hosts.
        """
        return self._spawn(target, args, fds, deliver_cancel)

    async def _stream_of(self, sock: socket.socket) -> UNIXSocketStream:
        return RemoteChildStream(await UNIXSocketStream.from_socket(sock))

    def _send_spawn(
        self, name: str, args: tuple[object, ...], fds: Iterable[FileDescriptorLike]
    ) -> Spawning:
        if isinstance(fds, (str, bytes)) or list(fds):
            raise TypeError(NO_FDS)
        payload = pickle_arguments(
            (name, sniffio.current_async_library(), list(args)), "spawn", args
        )
        self._check()
        stream, sock = self._mux.open_stream()
        try:
            self._mux.expect(self._stream, stream)
            id, slot = self._channel.spawn(payload, [])
        except BaseException:
            sock.close()
            raise

        def process_of(started: _wire.Frame) -> Process | None:
            # Its pidfd stays with the relay there, which signals through it.
            if started.op != _wire.STARTED or len(started.payload) != _wire.PID.size:
                return None
            (pid,) = _wire.PID.unpack(started.payload)
            return RemoteProcess(pid, None, slot, mux=self._mux, stream=stream)

        return Spawning(id, slot, sock, process_of)

    def _check(self) -> None:
        try:
            self._channel.check()
        except BrokenTemplateError:
            self._mux.check()  # the connection's own reason, if it broke
            raise
        self._mux.check()

    async def _translate(self, waiting: Awaitable[_wire.Frame]) -> _wire.Frame:
        """Await a reply; a broken channel is explained by the connection if it broke."""
        try:
            return await waiting
        except BrokenTemplateError:
            self._mux.check()
            raise

    async def _request(self, op: int, payload: bytes = b"") -> None:
        await self._translate(self._channel.wait(self._channel.command(op, payload)))

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """Serve the channel while the block runs, then end the template."""
        body_error: BaseException | None = None
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._channel.run)
            try:
                yield
            except BaseException as exc:
                body_error = exc  # raised below, as itself, outside the task group
            finally:
                await self._aclose()
        if body_error is not None:
            raise body_error

    async def _aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            self._channel.close()
            # As locally: SIGTERM interrupts a command it is running.
            self._mux.signal(self._stream, signal.SIGTERM)
            if self._exit is not None:
                with anyio.move_on_after(CLOSE_TIMEOUT):
                    await self._exit.event.wait()
                if not self._exit.event.is_set():
                    self._mux.signal(self._stream, signal.SIGKILL)
                    await self._exit.event.wait()


@asynccontextmanager
async def open_remote_template(
    destination: str | Sequence[str],
    *,
    python: str = "python3",
    preload: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    forward_imports: bool = True,
    link_timeout: float = 30.0,
) -> AsyncIterator[RemoteTemplate]:
    """Start a template on another host, and end it and everything it started on exit.

    Use as ``async with open_remote_template("user@host") as template:``. Nothing of
    trio_fork needs to be installed there, only a Python 3.11 or later: the worker
    side is sent over the connection and started from its sources. See
    :doc:`remote` for the model.

    Args:
        destination: An ssh destination (``"user@host"``, run as ``ssh -T -o
            BatchMode=yes DESTINATION sh`` with your ssh configuration, keys and
            agent), or the whole transport command, as a sequence: any program whose
            stdin and stdout reach the other host, with ``sh`` appended to it
            (``["ssh", "-p", "2222", "host"]``, ``["docker", "exec", "-i", "box"]``,
            ``["ip", "netns", "exec", "h2"]``).
        python: The remote interpreter, a command name or a path there.
        preload: Modules to import in the template before it is handed out.
        env: The template's whole environment (default: what the remote command
            gets there).
        cwd: The template's working directory there (default: where the remote
            command starts, the home directory for ssh).
        forward_imports: Serve modules the other host lacks from this process's
            ``sys.path`` (pure Python only; never the standard library), so that
            code of your own runs there without being deployed.
        link_timeout: Seconds without a word from the other side before the link
            is taken for lost; each side says something at least every third of
            it. The other side then kills everything it started.

    Yields:
        RemoteTemplate: The ready template, with ``preload`` imported.

    Raises:
        BrokenTemplateError: The connection could not be made (the message carries
            the transport's stderr: host key mismatch, failed authentication,
            unknown host), the remote Python is missing or too old, or no answer
            came within ``link_timeout``.
        RemoteError: A preloaded module failed to import.
    """
    modules = module_names(preload, "preload")
    command, name = transport_command(destination)
    if not isinstance(python, str) or not python:
        raise TypeError(f"python: expected a command name or path, got {python!r}")
    if not link_timeout > 0:
        raise ValueError(f"link_timeout must be positive, not {link_timeout!r}")
    settings = {
        "env": None if env is None else {str(k): str(v) for k, v in env.items()},
        "cwd": None if cwd is None else os.fspath(cwd),
        "imports": bool(forward_imports),
        "timeout": float(link_timeout),
    }
    mux = Mux.launch(
        command, name, float(link_timeout), _forwarding.answer if forward_imports else None
    )
    body_error: BaseException | None = None
    try:
        await _boot(mux, python, settings)
        async with anyio.create_task_group() as task_group:
            await task_group.start(mux.run)
            try:
                async with _opened(mux, name) as template:
                    if modules:
                        await template.require(*modules)
                    yield template
            except BaseException as exc:
                body_error = exc  # raised below, as itself, outside the task group
            finally:
                await mux.aclose(CLOSE_TIMEOUT)
        if body_error is not None:
            raise body_error
    finally:
        if mux.process.poll() is None:
            mux.process.kill()
        mux.process.wait()
        mux.discard()


async def _boot(mux: Mux, python: str, settings: Mapping[str, object]) -> None:
    """Start the relay there: the remote Python says its version, then gets the sources."""
    line = f"exec {shlex.quote(python)} -c {shlex.quote(_STAGE1)} sources relay:0:1 0 0 /\n"
    mux.write_raw(line.encode())
    version = b""
    with anyio.move_on_after(mux.timeout):
        version = await mux.read_line(_MARKER)
    if not version:
        mux.process.kill()
        raise await mux.failure(f"no answer within {mux.timeout:g} s")
    try:
        found = tuple(int(part) for part in version.split(b"."))
    except ValueError:
        raise await mux.failure(f"the remote Python said {version!r}") from None
    if found < MINIMUM_PYTHON:
        raise await mux.failure(
            f"the remote Python ({python}) is {'.'.join(map(str, found))}, but trio_fork "
            f"needs {'.'.join(map(str, MINIMUM_PYTHON))} or later"
        )
    boot = BOOTSTRAP.encode()
    setup = b"".join(_wire.encode(_relay.SETUP, 0, marshal.dumps(dict(settings)))[0][0])
    mux.write_raw(b"%08d" % len(boot) + boot + worker_sources() + setup)


@asynccontextmanager
async def _opened(mux: Mux, name: str) -> AsyncIterator[RemoteTemplate]:
    """The template the relay forked, once ready, on the stream numbered 1."""
    stream, sock = mux.open_stream()
    channel = Channel(Transport(sock), f"remote template on {name}")
    ready = channel.expect_ready()
    template = RemoteTemplate._create(mux, channel, stream, 0, name)
    async with template._serving():
        try:
            frame = await channel.wait(ready)
        except BrokenTemplateError:
            raise await mux.failure("the remote template did not start") from None
        template._pid = _wire.IDENTITY.unpack(frame.payload)[0]
        template.__attrs_post_init__()  # its name, with the pid
        mux.started()
        yield template
