"""Running programs from a template: ``Template.open_process`` and ``Template.run_process``.

AnyEvent::Fork's "faster fork+exec". ``anyio.open_process`` forks the calling
process, whose page tables grow with it (a 2 GB program forks slowly) and whose
threads and event loop a fork copies; here the template forks, and its child execs
the program (:mod:`trio_fork.worker._exec`), so the calling process never forks. The
program gets what :mod:`subprocess` would give it: the default disposition of every
signal and an empty mask, only the descriptors asked for, the caller's environment
and directory unless others are given, and an exec that fails raises its real
``OSError`` here.

The program is a child of the template, not of this process: its exit status comes
from the template's report (as for :class:`~trio_fork.Child`), and it dies with the
template.
"""

from __future__ import annotations

import errno
import os
import subprocess
import weakref
from abc import ABCMeta
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from io import BytesIO
from signal import SIGKILL, SIGTERM
from subprocess import PIPE, CalledProcessError, CompletedProcess
from typing import IO, TYPE_CHECKING, Any, final

import anyio
import anyio.abc

from ._arguments import dup_fd
from ._channel import remote_error
from ._construct import NoPublicConstructor
from ._pipe_streams import PipeReceiveStream, PipeSendStream, aclose_all
from ._transport import receive_frame, unpack_strings
from .worker import _wire

if TYPE_CHECKING:
    import socket

    from ._child import Process
    from ._template import Template

StrOrBytesPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
"""A command, an argument or a directory, as :mod:`subprocess` takes them."""

_TARGET = "trio_fork.worker._exec:run"
# Templates that have imported the exec side, so that their children need not.
_prepared: weakref.WeakSet[Template] = weakref.WeakSet()


class _NoPublicConstructorABC(NoPublicConstructor, ABCMeta):
    """:class:`NoPublicConstructor` for a class with abstract bases (anyio's Process)."""


@final
class TemplateProcess(anyio.abc.Process, metaclass=_NoPublicConstructorABC):
    """A program that a template exec'd: what :meth:`Template.open_process` returns.

    An :class:`anyio.abc.Process`: ``async with`` it, or call :meth:`aclose`, to close
    its streams and wait for it (killing it if the wait is cancelled). It is not a
    child of this process but of the template, which reports its exit status, and
    signals reach it through a pidfd. It dies with its template.
    """

    def __init__(
        self,
        process: Process,
        template: Template,
        stdin: PipeSendStream | None,
        stdout: PipeReceiveStream | None,
        stderr: PipeReceiveStream | None,
    ) -> None:
        self._process = process
        self._template: Template | None = template
        template._blocks += 1
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr

    def __repr__(self) -> str:
        return f"<trio_fork.TemplateProcess {self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def stdin(self) -> anyio.abc.ByteSendStream | None:
        return self._stdin

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stdout

    @property
    def stderr(self) -> anyio.abc.ByteReceiveStream | None:
        return self._stderr

    async def wait(self) -> int:
        """Wait for the program to exit; its status (``-N``: killed by signal ``N``).

        Raises:
            BrokenTemplateError: The template died first, and its exit status with it.
        """
        code = await self._process.wait()
        self._release()
        return code

    def send_signal(self, signal: int) -> None:
        self._process.send_signal(signal)

    def terminate(self) -> None:
        self._process.send_signal(SIGTERM)

    def kill(self) -> None:
        self._process.send_signal(SIGKILL)

    async def aclose(self) -> None:
        await aclose_all((self._stdin, self._stdout, self._stderr))
        try:
            await self.wait()
        except BaseException:
            await self._end(None)
            raise

    async def _end(
        self, deliver_cancel: Callable[[TemplateProcess], Awaitable[object]] | None
    ) -> None:
        """Kill it (or ``deliver_cancel`` it) and wait, shielded, until it is gone."""
        try:
            hook = None if deliver_cancel is None else lambda: deliver_cancel(self)
            await self._process.end(hook)
        finally:
            self._release()

    def _release(self) -> None:
        # Its end is known: the pidfd has nothing left to do, and the template may be
        # exported again.
        if self._template is not None:
            self._template._blocks -= 1
            self._template = None
            self._process.close()


async def open_process(
    template: Template,
    command: StrOrBytesPath | Sequence[StrOrBytesPath],
    *,
    stdin: int | IO[Any] | None = PIPE,
    stdout: int | IO[Any] | None = PIPE,
    stderr: int | IO[Any] | None = PIPE,
    cwd: StrOrBytesPath | None = None,
    env: Mapping[str, str] | None = None,
    startupinfo: Any = None,
    creationflags: int = 0,
    start_new_session: bool = False,
    pass_fds: Sequence[int] = (),
    user: str | int | None = None,
    group: str | int | None = None,
    extra_groups: Iterable[str | int] | None = None,
    umask: int = -1,
) -> TemplateProcess:
    """Run a program from the template; it runs on when this returns.

    :func:`anyio.open_process`, with the program forked from the template and exec'd
    there: this process never forks. Use as ``async with await
    template.open_process([...]) as process:``.

    The program gets what :mod:`subprocess` gives one: each signal's default
    disposition (SIGPIPE and SIGXFSZ included) and an empty signal mask; standard
    streams as asked, and of this process's other descriptors only ``pass_fds``, at
    the same numbers (nothing that the template holds or has queued); this process's
    environment and working directory (not the template's), unless ``env`` and
    ``cwd`` say otherwise. A program found on ``PATH`` is looked up in the ``PATH``
    of that environment.

    Args:
        command: A sequence: the program and its arguments. A string (or bytes, or
            a path): a command line for ``/bin/sh -c``.
        stdin, stdout, stderr: :data:`subprocess.PIPE` (a stream on the returned
            process), :data:`subprocess.DEVNULL`, a file descriptor or an object
            with ``fileno()``, or ``None`` for this process's own; ``stderr`` may
            also be :data:`subprocess.STDOUT`.
        cwd: The program's working directory (default: this process's).
        env: The program's environment (default: this process's).
        startupinfo, creationflags: For Windows; refused here unless left alone.
        start_new_session: Run the program in a session of its own (``setsid``).
        pass_fds: Descriptors of this process that the program gets, at the same
            numbers.
        user, group, extra_groups: Names or ids the program runs as (this needs
            the template to have the privilege).
        umask: If not negative, the program's umask.

    Returns:
        TemplateProcess: An :class:`anyio.abc.Process`.

    Raises:
        OSError: The program could not be run: the error the exec (or the change to
            ``cwd``) failed with, such as :exc:`FileNotFoundError` or
            :exc:`PermissionError`, with its file name. No process is left.
        TypeError: An argument has the wrong type.
        ValueError: An argument has a wrong value (an empty command, a NUL byte).
        BrokenTemplateError: The template died.
    """
    if startupinfo is not None or creationflags:
        raise ValueError("startupinfo and creationflags are only supported on Windows")
    if isinstance(command, (str, bytes, os.PathLike)):
        argv = [b"/bin/sh", b"-c", _encode(command, "command")]
    else:
        argv = [_encode(arg, "command") for arg in command]
        if not argv:
            raise ValueError("command: the sequence is empty")
    environ = {
        _encode(key, "env"): _encode(value, "env")
        for key, value in (os.environ if env is None else env).items()
    }
    if any(not key or b"=" in key for key in environ):
        raise ValueError("env: a variable name is empty or contains '='")
    if os.path.dirname(argv[0]):
        executables = [argv[0]]
    else:
        # Looked up in the PATH of the program's environment, as subprocess does.
        path = os.get_exec_path(environ)  # type: ignore[arg-type]
        executables = [os.path.join(os.fsencode(entry), argv[0]) for entry in path]
    if cwd is not None:
        directory: bytes | None = _encode(cwd, "cwd")
    else:
        try:
            directory = os.getcwdb()
        except OSError:
            directory = None  # this process's directory is gone: the template's then
    gid, groups, uid = _identity(user, group, extra_groups)
    if not isinstance(umask, int):
        raise TypeError(f"umask must be an int, not {type(umask).__name__}")
    ours: list[PipeSendStream | PipeReceiveStream | None] = []
    theirs: list[int] = []
    numbers = [0, 1, 2]
    try:
        for number, how in enumerate((stdin, stdout, stderr)):
            stream, fd = _standard_stream(number, how, theirs)
            ours.append(stream)
            theirs.append(fd)
        if isinstance(pass_fds, (int, str, bytes)):
            raise TypeError(f"pass_fds: expected a sequence of descriptors, got {pass_fds!r}")
        for index, fd in enumerate(pass_fds):
            if isinstance(fd, bool) or not isinstance(fd, int):
                raise TypeError(f"pass_fds: item {index} ({fd!r}) is not a file descriptor")
            if fd > 2 and fd not in numbers:  # the standard streams are set above
                theirs.append(dup_fd(fd, "pass_fds", index))
                numbers.append(fd)
        session = bool(start_new_session)
        spec = (executables, argv, environ, directory, numbers, session, umask, gid, groups, uid)
        if template not in _prepared:
            await template.require("trio_fork.worker._exec")
            _prepared.add(template)
        process, sock = await template._start_process(_TARGET, (spec,), theirs)
    except BaseException:
        await aclose_all(ours)
        raise
    finally:
        _wire.close_all(theirs)
    try:
        await _check_exec(sock, process, argv[0], cwd)
    except BaseException:
        await aclose_all(ours)
        raise
    stdin_stream, stdout_stream, stderr_stream = ours
    assert not isinstance(stdin_stream, PipeReceiveStream)
    assert not isinstance(stdout_stream, PipeSendStream)
    assert not isinstance(stderr_stream, PipeSendStream)
    return TemplateProcess._create(process, template, stdin_stream, stdout_stream, stderr_stream)


async def _check_exec(
    sock: socket.socket, process: Process, program: bytes, cwd: StrOrBytesPath | None
) -> None:
    """Wait until the child has exec'd the program (end of file), or raise why not."""
    try:
        try:
            frame = await receive_frame(sock)
        except OSError:
            frame = None  # the slot says what became of it
    except BaseException:
        sock.close()
        await process.end(None)
        process.close()
        raise
    sock.close()
    if frame is None:
        return
    _wire.close_all(frame.fds)
    await process.end(None)
    process.close()
    if frame.op == _wire.ERROR:
        raise remote_error(frame)
    step, number = (str(field) for field in unpack_strings(frame.payload, 2))
    code = int(number)
    if step == "exec":
        raise OSError(code, os.strerror(code), os.fsdecode(program))
    if step == "cwd":
        assert cwd is not None
        raise OSError(code, os.strerror(code), os.fsdecode(cwd))
    raise OSError(code, f"{os.strerror(code)} (while setting up the program)")


def _encode(value: object, what: str) -> bytes:
    try:
        data = os.fsencode(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what}: expected str, bytes or os.PathLike, not {type(value).__name__}"
        ) from None
    if b"\0" in data:
        raise ValueError(f"{what}: embedded null byte in {value!r}")
    return data


def _standard_stream(
    number: int, how: int | IO[Any] | None, sent: list[int]
) -> tuple[PipeSendStream | PipeReceiveStream | None, int]:
    """Our end of standard stream ``number`` (if a pipe), and the program's end."""
    if how == PIPE:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        if number == 0:
            return PipeSendStream(write_end), read_end
        return PipeReceiveStream(read_end), write_end
    if how == subprocess.DEVNULL:
        return None, os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    if how == subprocess.STDOUT:
        if number != 2:
            raise ValueError("STDOUT is only for stderr")
        return None, os.dup(sent[1])
    if how is None:
        try:
            return None, os.dup(number)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            # Closed here: a program is better off with /dev/null than with a hole.
            return None, os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    if isinstance(how, int) and how < 0:
        raise ValueError(f"{('stdin', 'stdout', 'stderr')[number]}: {how} is not a descriptor")
    return None, dup_fd(how, ("stdin", "stdout", "stderr")[number], 0)


def _identity(
    user: str | int | None, group: str | int | None, extra_groups: Iterable[str | int] | None
) -> tuple[int | None, list[int] | None, int | None]:
    """Group id, supplementary groups and user id, resolved here as subprocess does."""
    import grp
    import pwd

    def group_id(name: str | int) -> int:
        return grp.getgrnam(name).gr_gid if isinstance(name, str) else int(name)

    uid = None if user is None else pwd.getpwnam(user).pw_uid if isinstance(user, str) else user
    gid = None if group is None else group_id(group)
    groups = None if extra_groups is None else [group_id(name) for name in extra_groups]
    return gid, groups, uid


async def run_process(
    template: Template,
    command: StrOrBytesPath | Sequence[StrOrBytesPath],
    *,
    input: bytes | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = PIPE,
    stderr: int | IO[Any] | None = PIPE,
    check: bool = True,
    cwd: StrOrBytesPath | None = None,
    env: Mapping[str, str] | None = None,
    startupinfo: Any = None,
    creationflags: int = 0,
    start_new_session: bool = False,
    pass_fds: Sequence[int] = (),
    user: str | int | None = None,
    group: str | int | None = None,
    extra_groups: Iterable[str | int] | None = None,
    umask: int = -1,
    deliver_cancel: Callable[[TemplateProcess], Awaitable[object]] | None = None,
) -> CompletedProcess[bytes]:
    """Run a program from the template and wait until it exits.

    :func:`anyio.run_process`, with the program forked from the template and exec'd
    there (see :meth:`open_process`): this process never forks.

    If the call is cancelled, the program is killed (or ``deliver_cancel(process)``
    is called to end it some other way, as with :func:`trio.run_process`) and waited
    for before the cancellation is raised.

    The other arguments are those of :meth:`open_process`, but ``stdin`` defaults to
    this process's own.

    Args:
        input: Bytes written to the program's standard input, which is then closed.
        check: Raise :exc:`subprocess.CalledProcessError` if the program exits with
            another status than 0.
        deliver_cancel: An async function that ends the program when the call is
            cancelled, as for :meth:`spawn`; the default sends SIGKILL.

    Returns:
        subprocess.CompletedProcess: The command, the exit status (``-N``: killed by
        signal ``N``) and what the program wrote to the streams that were pipes.

    Raises:
        subprocess.CalledProcessError: ``check`` is true, and the status is not 0.
        OSError: The program could not be run (see :meth:`open_process`).
        BrokenTemplateError: The template died.
    """
    if stdin is not None and input is not None:
        raise ValueError("only one of stdin and input is allowed")
    process = await open_process(
        template,
        command,
        stdin=PIPE if input is not None else stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        startupinfo=startupinfo,
        creationflags=creationflags,
        start_new_session=start_new_session,
        pass_fds=pass_fds,
        user=user,
        group=group,
        extra_groups=extra_groups,
        umask=umask,
    )
    output: list[bytes | None] = [None, None]

    async def drain(stream: anyio.abc.ByteReceiveStream, index: int) -> None:
        buffer = BytesIO()
        async for chunk in stream:
            buffer.write(chunk)
        output[index] = buffer.getvalue()

    async def feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
        try:
            await stream.send(data)
        except anyio.BrokenResourceError:
            pass  # it exited, or closed its stdin, without reading it all: as subprocess
        await stream.aclose()

    try:
        async with anyio.create_task_group() as task_group:
            for index, stream in enumerate((process.stdout, process.stderr)):
                if stream is not None:
                    task_group.start_soon(drain, stream, index)
            if process.stdin is not None and input is not None:
                task_group.start_soon(feed, process.stdin, input)
            await process.wait()
    except BaseException:
        await process._end(deliver_cancel)
        raise
    finally:
        await aclose_all((process.stdin, process.stdout, process.stderr))
    code = process.returncode
    assert code is not None
    if check and code != 0:
        raise CalledProcessError(code, command, output[0], output[1])
    return CompletedProcess(command, code, output[0], output[1])
