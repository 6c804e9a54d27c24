"""A program run as ``__main__`` in a forked child: the worker side of ``trio_fork run``.

A ``trio_fork run`` server (``trio_fork._zygote_server``) keeps children of its
template waiting in :func:`serve`, some of them on its socket itself. A run's
request comes with the client's working directory and standard streams as
descriptors, and the child turns into what ``python script.py`` would have started:
the client's arguments, environment, umask and directory, its streams on fds 0-2 (a
terminal stays a terminal), a fresh ``__main__``, and the interpreter's way of
ending: threads joined, ``atexit`` handlers run, files flushed, the exit status of
``SystemExit``, and death by SIGINT after an uncaught KeyboardInterrupt.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import atexit
import builtins
import gc
import io
import os
import select
import socket
import sys

from . import _wire
from ._child import print_exception, set_title

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn


def report_files(sock: socket.socket) -> None:
    """Spawn target: the files of every module loaded here, for the server's freshness check."""
    names = [getattr(module, "__file__", None) for module in list(sys.modules.values())]
    sock.sendall(b"\0".join(os.fsencode(name) for name in names if isinstance(name, str)))


def serve(sock: socket.socket) -> None:
    """Spawn target: wait for a run, then become its program.

    The server either sends the run's request, or arms us: sends its listening
    socket, for us to take the next connection ourselves (see :func:`_take`).
    Returns (and the child exits) if the server lets this child go unused.
    """
    fds: list[int] = []
    try:
        header = _receive(sock, _wire.HEADER.size, fds)
        op, _, _, length = _wire.HEADER.unpack(header)
        payload = _receive(sock, length, fds)
    except EOFError:
        return
    request = (payload, fds) if op == _wire.ARGS else _take(sock, fds[0], payload)
    sock.close()  # the program must not see it
    if request is not None:
        _become(*request)


def _take(
    sock: socket.socket, listener_fd: int, fingerprint: bytes
) -> tuple[bytes, list[int]] | None:
    """Take a connection off the server's socket; its request if it is ours to run.

    The server hears of every connection taken, and serves those that are not ours:
    requests other than a run, and runs that our template is too old for.
    """
    _rehearse(fingerprint)
    with socket.socket(fileno=listener_fd) as listener:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while True:
            if any(events & select.POLLHUP for _, events in poller.poll()):
                return None  # the server stopped listening
            try:
                conn, _ = listener.accept()
                break
            except BlockingIOError:
                continue  # another spare took it
    sock.sendmsg([b"T"], _wire.ancillary([conn.fileno()]))
    with conn:
        conn.setblocking(True)
        credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(credentials[4:8], sys.byteorder) != os.getuid():
            return None  # the server refuses it, and says so
        # The client sends its request whole: its start is here, or nothing is. A run
        # of a sane size (the server's limit) is ours.
        head = conn.recv(16, socket.MSG_PEEK)
        ours = head[:4] == b"TFZ2" and head[12:] == b"run\0"
        if not (ours and int.from_bytes(head[4:12], "little") <= 64 << 20 and _fresh(fingerprint)):
            sock.send(b"N")
            return None
        fds: list[int] = []
        try:
            header = _receive(conn, 12, fds)
            payload = _receive(conn, int.from_bytes(header[4:], "little"), fds)
        except (EOFError, OSError):  # the client went away
            _wire.close_all(fds)
            return None
        return payload, [conn.detach(), *fds]


def _rehearse(fingerprint: bytes) -> None:
    """Do now, harmlessly, what a run will do first: touch what it touches.

    A forked child pays a page copy the first time it writes to each page (in Python,
    using an object writes its reference count): paid here, they are off the run's
    path. Half the time a spare takes from a run's start to its end goes to them.
    """
    _fresh(fingerprint)
    _set_environment([name + b"=" + value for name, value in os.environb.items()])
    unbuffered = bool(getattr(sys.stdout, "write_through", False))
    for fd in (0, 1, 2):
        _stdio(fd, unbuffered)
    main = type(sys)("__main__")
    path = os.path.abspath("rehearsal.py")
    os.path.isdir(os.path.dirname(path))
    exec(compile(b"", path, "exec", dont_inherit=True), main.__dict__)


def _fresh(fingerprint: bytes) -> bool:
    """Whether the files our template was built from are as they were (see _zygote_fresh)."""
    fields = fingerprint.split(b"\0")
    for path, then in zip(fields[::2], fields[1::2], strict=True):
        try:
            info = os.stat(path)
        except OSError:
            now = b"-"
        else:
            now = b"%d %d %d %d" % (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
        if now != then:
            return False
    return True


def _receive(conn: socket.socket, size: int, fds: list[int]) -> bytes:
    """``size`` bytes, and the descriptors (at most 8) that come with them."""
    data = bytearray()
    while len(data) < size:
        chunk, ancillary, flags, _ = conn.recvmsg(
            min(size - len(data), 1 << 20), socket.CMSG_SPACE(32), socket.MSG_CMSG_CLOEXEC
        )
        fds += _wire.parse_ancillary(ancillary)
        if flags & socket.MSG_CTRUNC:
            raise OSError("descriptors were lost in transit (is RLIMIT_NOFILE too low?)")
        if not chunk:
            raise EOFError("the connection ended in the middle of a message")
        data += chunk
    return bytes(data)


def _become(payload: bytes, fds: list[int]) -> NoReturn:
    """Become the program: the client's arguments, environment, directory and streams."""
    fields = payload.split(b"\0")
    (_, mode, target, program, executable, umask, unbuffered, present, ignored, count) = fields[:10]
    rest = fields[10:]
    conn, cwd, *streams = fds
    os.setpgid(0, 0)  # its own group: what the terminal's signals reach, forwarded
    set_title(os.path.basename(os.fsdecode(program)))  # "python3", as ps shows python
    for fd in (0, 1, 2):
        if str(fd).encode() in present:
            os.dup2(streams.pop(0), fd)
        else:
            os.close(fd)
    _wire.close_all([fd for fd in fds if fd > 2 and fd not in (conn, cwd)])
    os.fchdir(cwd)
    os.close(cwd)
    os.umask(int(umask, 8))
    tz = os.environ.get("TZ")
    _set_environment(rest[int(count) :])
    if os.environ.get("TZ") != tz and "time" in sys.modules:
        sys.modules["time"].tzset()
    for sig in filter(None, ignored.split(b",")):
        _signal.signal(int(sig), _signal.SIG_IGN)
    sys.argv = [os.fsdecode(arg) for arg in rest[: int(count)]]
    sys.executable = os.fsdecode(executable)  # the client's name for the interpreter
    sys.stdin, sys.stdout, sys.stderr = (
        _stdio(fd, unbuffered == b"u") if str(fd).encode() in present else None  # closed
        for fd in (0, 1, 2)
    )
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr  # type: ignore[misc]
    # Out of the way of the program's own descriptors: the client hears from us here
    # how we end, before the template could tell the server.
    client = os.dup2(conn, min(os.sysconf("SC_OPEN_MAX"), 1024) - 1, False)
    os.close(conn)
    _finish(client, os.getpid(), *_run(mode.decode(), os.fsdecode(target), os.fsdecode(program)))


def _set_environment(entries: list[bytes]) -> None:
    """Make the environment the client's, changing only what differs (usually nothing)."""
    environ = os.environb
    wanted = dict(entry.split(b"=", 1) for entry in entries)
    if dict(environ) == wanted:
        return
    for name in [name for name in environ if name not in wanted]:
        del environ[name]
    for name, value in wanted.items():
        if environ.get(name) != value:
            environ[name] = value


def _stdio(fd: int, unbuffered: bool) -> Any:
    """``sys.stdin``, ``stdout`` or ``stderr`` as the interpreter makes them at start-up.

    The template's were made for its own descriptors, which are not terminals: they
    do for the program's unless those are (a terminal's are line-buffered).
    """
    old: Any = (sys.stdin, sys.stdout, sys.stderr)[fd]
    line_buffering = not unbuffered and (fd == 2 or os.isatty(fd))
    if old is not None and (old.line_buffering, old.write_through) == (
        line_buffering,
        unbuffered and fd > 0,
    ):
        return old
    raw = io.FileIO(fd, "wb" if fd else "rb", closefd=False)
    raw.name = ("<stdin>", "<stdout>", "<stderr>")[fd]
    buffer: Any = raw
    if not fd:
        buffer = io.BufferedReader(raw)
    elif not unbuffered:
        buffer = io.BufferedWriter(raw)
    stream = io.TextIOWrapper(
        buffer,
        encoding=getattr(old, "encoding", None) or "utf-8",
        errors=getattr(old, "errors", None) or ("backslashreplace" if fd == 2 else "strict"),
        newline="\n",
        line_buffering=line_buffering,
        write_through=unbuffered and fd > 0,
    )
    stream.mode = "w" if fd else "r"  # type: ignore[misc]
    return stream


def _run(mode: str, target: str, program: str) -> tuple[int, bool]:
    """Run the program in a new ``__main__``: its exit code, and whether Ctrl-C ended it."""
    main = type(sys)("__main__")
    main.__dict__.update(__builtins__=builtins, __spec__=None)
    if sys.version_info < (3, 14):  # from 3.14 (PEP 649), only code that annotates has them
        main.__annotations__ = {}
    main.__loader__ = sys.modules["_frozen_importlib"].BuiltinImporter
    sys.modules["__main__"] = main
    path = os.path.abspath(target) if mode == "script" else ""
    safe = getattr(sys.flags, "safe_path", False)
    try:
        if mode == "script" and not os.path.isdir(path):
            try:
                with open(path, "rb") as file:
                    source = file.read()
            except OSError as exc:
                message = f"{program}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}"
                print(message, file=sys.stderr)
                return 2, False
            if not source.startswith(b"PK\x03\x04"):  # else a zip application
                sys.path[:0] = [] if safe else [os.path.dirname(path)]
                loader = sys.modules["_frozen_importlib_external"].SourceFileLoader
                main.__dict__.update(__file__=path, __loader__=loader("__main__", path))
                if sys.version_info < (3, 15):  # 3.15's __main__ has no __cached__
                    main.__dict__["__cached__"] = None
                exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)
                return 0, False
        if mode == "code":
            sys.path[:0] = [] if safe else [""]
            exec(compile(target, "<string>", "exec", dont_inherit=True), main.__dict__)
            return 0, False
        import runpy

        # As the interpreter runs -m and directories or zip files: through runpy.
        sys.path[:0] = [] if safe else [os.getcwd() if mode == "module" else path]
        name = target if mode == "module" else "__main__"
        runpy._run_module_as_main(name, alter_argv=mode == "module")  # type: ignore[attr-defined]
        return 0, False
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0), False
        print(exc.code, file=sys.stderr)
        return 1, False
    except BaseException as exc:
        print_exception(exc, None)
        return 1, isinstance(exc, KeyboardInterrupt)


def _finish(client: int, pid: int, code: int, interrupted: bool) -> NoReturn:
    """End as the interpreter does, without tearing down the template's modules."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()  # joins the threads, as the interpreter does
        atexit._run_exitfuncs()
        # Module teardown would close, and so flush, files nobody closed.
        for obj in gc.get_objects():
            if isinstance(obj, (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)):
                try:
                    if not obj.closed and obj not in (sys.stdout, sys.stderr):
                        obj.flush()
                except (OSError, ValueError):
                    pass
    except BaseException as exc:  # a KeyboardInterrupt while threads are joined, say
        print_exception(exc, None)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = 120 if stream is sys.stdout else code  # as the interpreter
    status = -_signal.SIGINT if interrupted else code & 0xFF
    if os.getpid() == pid:  # not in a process the program forked
        # What exiting does first: with our descriptors closed (streams at their end,
        # locks released), the client may say how we ended and go, at once.
        os.closerange(0, client)
        os.closerange(client + 1, os.sysconf("SC_OPEN_MAX"))
        try:
            os.write(client, b"x" + status.to_bytes(4, "little", signed=True))
        except OSError:
            pass  # the program closed it, or the client is gone
    if interrupted:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGINT)
    os._exit(code & 0xFF)
