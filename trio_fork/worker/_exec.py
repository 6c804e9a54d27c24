"""Exec'ing a program from a template: the child's side of ``Template.open_process``.

The parent never forks: a child of the template gives the program what the parent
asked for (its descriptors at their numbers and no other, a directory, a session,
the default disposition of every signal and an empty signal mask) and ``execve``s
it. The child's socket is close-on-exec: the parent reads end of file once the exec
has happened, or the errno of the step that failed, to raise the real ``OSError``.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import errno
import fcntl
import os

from . import _wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any, NoReturn


def run(sock: socket.socket, *rest: Any) -> NoReturn:
    """The target: ``run(sock, *queued, spec, *fds)``; the fds go to ``spec``'s numbers."""
    # The fds are the trailing ints; what the template had queued, before the spec,
    # is not the program's (its descriptors are closed below with the template's).
    count = len(rest)
    while type(rest[count - 1]) is int:
        count -= 1
    executables, argv, env, cwd, numbers, session, umask, gid, groups, uid = rest[count - 1]
    report, step = sock.fileno(), "setup"
    try:
        # Above every number asked for, so that no dup2 below overwrites one of them.
        above = max(numbers) + 1
        report = fcntl.fcntl(report, fcntl.F_DUPFD_CLOEXEC, above)
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in rest[count:]]
        for fd, number in zip(moved, numbers, strict=True):
            os.dup2(fd, number)  # inheritable: it survives the exec
        low = 0
        for keep in sorted({*numbers, report}):
            if low < keep:  # closerange(0, 0) would close them all (close_range(0, ~0))
                os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        if cwd is not None:
            # Before the user changes, as subprocess does: the program starts in the
            # directory even where its user could not enter it.
            step = "cwd"
            os.chdir(cwd)
            step = "setup"
        if session:
            os.setsid()
        if umask >= 0:
            os.umask(umask)
        if groups is not None:
            os.setgroups(groups)
        if gid is not None:
            os.setregid(gid, gid)
        if uid is not None:
            os.setreuid(uid, uid)
        # Handlers are reset by the exec itself; ignored signals (SIGPIPE, SIGXFSZ,
        # the template's SIGINT) would stay ignored in the program.
        for sig in _signal.valid_signals():
            if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
                if _signal.getsignal(sig) == _signal.SIG_IGN:
                    _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        step, first = "exec", 0
        for executable in executables:
            try:
                os.execve(executable, argv, env)
            except OSError as exc:
                # As subprocess: the first error that is not "not there", else the last.
                last = exc.errno or 0
                if not first and last not in (errno.ENOENT, errno.ENOTDIR):
                    first = last
        raise OSError(first or last, "")
    except OSError as exc:
        frame = _wire.encode(_wire.FAILED, 0, _wire.pack_strings(step, str(exc.errno)))
    except BaseException as exc:
        frame = _wire.encode(_wire.ERROR, 0, _wire.error_payload(exc))
    try:
        os.write(report, b"".join(frame[0][0]))
    finally:
        os._exit(255)
