"""``trio_fork run``'s client: ask a preloaded server to run a program, then stand in for it.

A program that imports numpy, pandas or a web framework spends hundreds of
milliseconds importing before it does anything, every time it starts. ``trio_fork
run script.py`` hands the run to a server (:mod:`trio_fork._zygote_server`) whose
template has imported all that once; a child forked from it runs the script as
``__main__`` (:mod:`trio_fork.worker._program`). This process, the client, stays
behind as the program's stand-in: it passes its arguments, environment, umask,
working directory and standard streams, forwards the signals it gets, and exits as
the program did, dying by the same signal if the program died by one.

Every run pays for the client's start-up, so this module imports the standard
library's C modules and nothing else: not trio, anyio or attrs, not even
:mod:`socket` or :mod:`signal`, whose enums cost more than the rest of a run. The
rarely taken paths (starting a server, ``--status``) import what they need.

The wire, over a Unix stream socket: the request is ``b"TFZ2"``, an 8-byte length
and NUL-separated fields (see :func:`request`), with the working directory, stdin,
stdout and stderr riding as ``SCM_RIGHTS``; after it, a byte for each signal to pass
on, and a 0 byte when the client leaves. Answers are ``x`` + the exit status (from
the program itself as it exits), ``X`` + the same (from the server once the program
is reaped, subprocess-style: -N for death by signal N), ``S`` + 4 zero bytes (the
program was sent SIGTSTP: stop), or ``T``/``E`` + 4-byte length + text.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import _socket
import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

MAGIC = b"TFZ2"
"""Starts every request; a new wire format gets a new one, and so new socket names."""
_FOREVER = 86400.0  # a socket timeout (seconds) that only makes the socket non-blocking
HEADER_SIZE = len(MAGIC) + 8
SIGNALS = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
    _signal.SIGWINCH,
    _signal.SIGTSTP,
    _signal.SIGCONT,
)
"""What the client forwards to the program."""
TERMINAL_SIGNALS = frozenset(
    (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGTSTP, _signal.SIGCONT, _signal.SIGWINCH)
)
"""Those a terminal sends to a whole foreground process group: the program's group
gets them, as the program's own subprocesses would under a shell."""
_CORE_SIGNALS = frozenset(
    getattr(_signal, name)
    for name in "SIGQUIT SIGILL SIGTRAP SIGABRT SIGBUS SIGFPE SIGSEGV SIGXCPU SIGXFSZ".split()
)
_USAGE = """\
usage: {prog} run [-v] [--preload MODULE[,MODULE...]]... [--] script.py [args...]
       {prog} run [-v] [--preload ...] -m module [args...]
       {prog} run [-v] [--preload ...] -c code [args...]
"""
_HELP = """
Run a Python program as `python script.py` would, in a process forked from a server
whose template has already imported the --preload modules. If no server for this
interpreter and preload list runs, one is started in the background.

options:
  -h, --help          show this help message and exit
  --preload MODULES   modules for the server's template to import (comma-separated,
                      or the option repeated); part of the server's identity
  -v, --verbose       say on stderr when a server is started
  -m module           run a module as a script (as python -m)
  -c code             run a string of code (as python -c)

The server: `{prog} serve --help`.
"""


class ZygoteError(Exception):
    """Why a run could not be made; the command line prints it and exits 1."""


class UsageError(Exception):
    """Bad arguments; the command line prints the usage and exits 2."""


def program_name() -> str:
    """How the user called us, for messages: ``trio-fork`` or ``python -m trio_fork``."""
    if os.path.basename(sys.argv[0]).startswith("trio-fork"):
        return "trio-fork"
    return "python -m trio_fork"


def preload_list(values: Sequence[str]) -> list[str]:
    """The module names of ``--preload`` options, each of which may hold several."""
    names = [name.strip() for value in values for name in value.split(",")]
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise UsageError(f"--preload: {name!r} is not a module name")
    return names


def runtime_directory() -> str:
    """A directory only this user can enter, for the sockets: made if need be, and checked.

    ``$XDG_RUNTIME_DIR/trio_fork`` where the session has one, else
    ``$TMPDIR/trio_fork-UID``. Anything else found there (another user's directory,
    a symbolic link, one that others may enter) is refused, not used.
    """
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(base):
        path = os.path.join(base, "trio_fork")
    else:
        path = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"trio_fork-{os.getuid()}")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # mkdir's mode is subject to the umask
        except FileExistsError:
            pass  # another client made it meanwhile
        except OSError as exc:
            raise ZygoteError(f"cannot make the directory {path!r}: {exc.strerror}") from None
        info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ZygoteError(f"{path!r} is not a directory: remove it, or set XDG_RUNTIME_DIR")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ZygoteError(
            f"{path!r} belongs to uid {info.st_uid} with mode {info.st_mode & 0o777:o}: the "
            f"sockets need a directory of uid {os.getuid()}'s own with mode 700"
        )
    return path


def base_path() -> list[str]:
    """``sys.path`` without the entry that names the running script's directory."""
    return list(sys.path if getattr(sys.flags, "safe_path", False) else sys.path[1:])


def server_key(preload: Sequence[str]) -> str:
    """The name of the server for this interpreter, its settings and ``preload``.

    Everything that decides what a template imports is in it: the interpreter, the
    import path, the ``PYTHON*`` variables and the locale's.
    """
    settings = sorted(
        f"{name}={value}"
        for name, value in os.environ.items()
        if name.startswith("PYTHON") or name in ("LANG", "LC_ALL", "LC_CTYPE")
    )
    # The interpreter itself, whichever of its names (python, python3) ran us.
    python = os.path.realpath(sys.executable)
    fields = [MAGIC.decode(), python, ",".join(preload), *base_path(), "", *settings]
    material = "\0".join(fields).encode("utf-8", "surrogateescape")
    # Not hashlib, which would cost a run a few milliseconds: the remainder by a
    # Mersenne prime tells configurations apart as well, if not adversaries (who
    # would have to be this user already).
    return f"{int.from_bytes(material, 'big') % ((1 << 127) - 1):032x}"[:24]


def socket_path(preload: Sequence[str]) -> str:
    return os.path.join(runtime_directory(), server_key(preload) + ".sock")


def connect(path: str) -> _socket.socket | None:
    """A connection to the server at ``path``, or None if none listens there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise ZygoteError(f"cannot connect to {path!r}: {exc.strerror}") from None
    _, uid, _ = peer_credentials(sock)
    if uid != os.getuid():
        sock.close()
        raise ZygoteError(f"the server at {path!r} runs as uid {uid}, not as you: not using it")
    return sock


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end, as it connected."""
    data = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(data[i : i + 4], sys.byteorder) for i in (0, 4, 8))
    return pid, uid, gid


def send_request(sock: _socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send one request; the descriptors ride on its first byte."""
    data = memoryview(MAGIC + len(payload).to_bytes(8, "little") + payload)
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _pack_fds(fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def _pack_fds(fds: Sequence[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


class Answers:
    """The messages the server and the program send back, read as they come."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> tuple[bytes, bytes] | None:
        """The next message (kind, body), or None at end of file."""
        while True:
            message = self._parse()
            if message is not None:
                return message
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data

    def _parse(self) -> tuple[bytes, bytes] | None:
        buffer = self.buffer
        if not buffer:
            return None
        kind = buffer[:1]
        fixed = kind in (b"X", b"x")
        size = 5 if fixed else 5 + int.from_bytes(buffer[1:5], "little")
        if len(buffer) < size:
            return None
        self.buffer = buffer[size:]
        return kind, buffer[1:size] if fixed else buffer[5:size]


def request(mode: str, target: str, argv: Sequence[str]) -> tuple[bytes, list[int]]:
    """The payload and descriptors of a run: everything the program inherits from us.

    Fields: command, mode, target, the interpreter's name as typed (for messages) and
    as ``sys.executable`` says, umask (octal),
    ``u`` if stdout is unbuffered (``-u``), which of fds 0-2 ride along, the signals
    we ignore (a program under ``nohup`` ignores SIGHUP too), the number of
    arguments, the arguments, then ``NAME=value`` for each environment variable.
    """
    umask = os.umask(0)
    os.umask(umask)
    ignored = [
        str(sig)
        for sig in _signal.valid_signals()
        if sig not in (_signal.SIGPIPE, _signal.SIGXFSZ) and _ignored(sig)
    ]
    present = ""
    for fd in (0, 1, 2):
        try:
            os.get_inheritable(fd)
        except OSError:
            continue  # closed: the program starts with it closed too
        present += str(fd)
    # Opened after the check: it may take the number of a closed standard stream.
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = [cwd, *map(int, present)]
    unbuffered = sys.stdout is not None and getattr(sys.stdout, "write_through", False)
    fields = [
        b"run",
        mode.encode(),
        os.fsencode(target),
        os.fsencode(sys.orig_argv[0] if sys.orig_argv else sys.executable),
        os.fsencode(sys.executable),
        f"{umask:o}".encode(),
        b"u" if unbuffered else b"",
        present.encode(),
        ",".join(ignored).encode(),
        str(len(argv)).encode(),
        *map(os.fsencode, argv),
        *(name + b"=" + value for name, value in os.environb.items()),
    ]
    return b"\0".join(fields), fds


def _ignored(sig: int) -> bool:
    return bool(_signal.getsignal(sig) == _signal.SIG_IGN)


def parse_run(args: Sequence[str]) -> tuple[list[str], bool, str, str, list[str]]:
    """``run``'s arguments: (preload, verbose, mode, target, program's argv).

    Options end at the script's name, at ``-m`` or ``-c`` (whose value is the
    program's), or at ``--``: everything after belongs to the program.
    """
    preload: list[str] = []
    verbose = False
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-h", "--help"):
            raise SystemExit(_print_help())
        if arg in ("-v", "--verbose"):
            verbose = True
        elif arg == "--preload" or arg.startswith("--preload="):
            if arg == "--preload":
                index += 1
                if index == len(args):
                    raise UsageError("--preload needs a module name")
                value = args[index]
            else:
                value = arg.partition("=")[2]
            preload += preload_list([value])
        elif arg[:2] in ("-m", "-c"):
            value = arg[2:]
            if not value:
                index += 1
                if index == len(args):
                    raise UsageError(f"{arg} needs an argument")
                value = args[index]
            mode = "module" if arg[:2] == "-m" else "code"
            rest = list(args[index + 1 :])
            return preload, verbose, mode, value, [arg[:2], *rest]
        elif arg == "--":
            index += 1
            break
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg!r} (options go before the program)")
        else:
            break
        index += 1
    if index == len(args):
        raise UsageError("no program to run: give a script, -m module or -c code")
    if args[index] == "-":
        raise UsageError("a program on stdin ('-') cannot be run by a server")
    return preload, verbose, "script", args[index], list(args[index:])


def _print_help() -> int:
    prog = program_name()
    sys.stdout.write(_USAGE.format(prog=prog) + _HELP.format(prog=prog))
    return 0


def main(args: Sequence[str]) -> NoReturn:
    """``run ARGS``: exit with the program's status, or die by the signal it died by."""
    status = _status(args)
    if status < 0:
        die_by(-status)
    # Without the interpreter's teardown, which would cost every run a millisecond
    # of CPU and undo nothing that matters here; but with the atexit handlers that a
    # sitecustomize may have added (coverage's, say).
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _status(args: Sequence[str]) -> int:
    prog = program_name()
    try:
        preload, verbose, mode, target, argv = parse_run(args)
        path = socket_path(preload)
        payload, fds = request(mode, target, argv)
        try:
            return _run(path, preload, verbose, payload, fds)
        finally:
            os.close(fds[0])
    except UsageError as exc:
        sys.stderr.write(f"{_USAGE.format(prog=prog)}{prog} run: error: {exc}\n")
        return 2
    except ZygoteError as exc:
        sys.stderr.write(f"{prog} run: {exc}\n")
        return 1


def _run(path: str, preload: Sequence[str], verbose: bool, payload: bytes, fds: list[int]) -> int:
    sock = connect(path)
    if sock is None:
        from ._zygote_control import start_server  # the rare path: its imports too

        sock = start_server(path, preload, verbose)
    try:
        stand_in = StandIn(sock)
        held = stand_in.hold_signals()
        try:
            send_request(sock, payload, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # what we read next says why (a program that ran and ended already?)
        finally:
            stand_in.pass_signals(held)
        return stand_in.wait()
    finally:
        _signal.set_wakeup_fd(-1)
        sock.close()


class StandIn:
    """Pass the signals we get on to the program, and learn how it ended.

    Signals go to the server as one byte each, on the connection; the server, which
    holds the program's pidfd, delivers them. They are written by the interpreter's
    C-level handler itself, as the signal's *wakeup fd* is the connection: a signal
    is passed on the moment it comes, wherever the client is. (A Python handler
    runs later, between two bytecodes: one that came just before a blocking
    ``recv`` would wait for the program's end, and the program for it.) Python's
    handlers do nothing, except that the server answers SIGTSTP with ``S``: stop
    ourselves too, as the shell expects of its job.
    """

    def __init__(self, sock: _socket.socket) -> None:
        self.answers = Answers(sock)
        self.sock = sock
        self.signals = [sig for sig in SIGNALS if not _ignored(sig)]
        for sig in self.signals:
            _signal.signal(sig, _pass)

    def hold_signals(self) -> object:
        """Hold signals while the request is on its way: they wait in the kernel."""
        return _signal.pthread_sigmask(_signal.SIG_BLOCK, self.signals)

    def pass_signals(self, held: object) -> None:
        """Let the held signals through, each as a byte after the request, never inside it."""
        try:
            # A timeout makes the socket non-blocking, as a wakeup fd must be, while
            # our own reads still wait (in the interpreter's own poll).
            self.sock.settimeout(_FOREVER)
            _signal.set_wakeup_fd(self.sock.fileno(), warn_on_full_buffer=False)
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, held)

    def wait(self) -> int:
        """The program's exit status, subprocess-style."""
        while True:
            try:
                message = self.answers.next()
            except TimeoutError:
                continue
            except OSError as exc:
                raise ZygoteError(f"lost the server: {exc.strerror}") from None
            if message is None:
                raise ZygoteError("the server ended the connection (see its log)")
            kind, body = message
            if kind in (b"x", b"X"):
                # x: the program's own word, once it has closed its descriptors and
                # is about to exit; X: the server's, once the template reaped it. The
                # server hears that we leave of our own accord, and no more signals.
                _signal.set_wakeup_fd(-1)
                try:
                    self.sock.send(b"\0")
                except OSError:
                    pass
                return int.from_bytes(body, "little", signed=True)
            if kind == b"S":  # the program was sent our SIGTSTP: SIGCONT wakes us both
                _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
                os.kill(os.getpid(), _signal.SIGTSTP)
                _signal.signal(_signal.SIGTSTP, _pass)
            elif kind == b"E":
                raise ZygoteError(body.decode("utf-8", "replace").rstrip("\n"))


def _pass(sig: int, frame: object) -> None:
    """The Python-level handler of a forwarded signal: the wakeup fd did the work."""


def die_by(sig: int) -> NoReturn:
    """End this process by signal ``sig``, as the program ended."""
    if sig in _CORE_SIGNALS:
        import resource

        # The program dumped its core, if any; ours would only mislead.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.stderr.flush()
    _signal.signal(sig, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal that does not kill (it cannot come from an exit status)
