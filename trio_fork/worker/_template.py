"""A template: the small synchronous command server that processes are forked from.

A template never runs an event loop or a thread, so forking it is safe and cheap. It
serves its owner's commands on one channel, in order, answering each with its id.
``FORK`` makes a new template, ``SPAWN`` a child that runs a target (see
:mod:`._child`). A template is a child subreaper: it reaps what it forks (or
adopts) and reports their exit statuses, and leads a process group that the kernel
kills however it ends. It ends when its owner closes the channel, sends SIGTERM or
dies: it kills and reaps everything below it, then exits. ``SERVE_FORKS`` makes it
also fork a new template per message on a ``SOCK_SEQPACKET`` socket, from any thread
or process: how a template outlives one event loop (see ``trio_fork._handle``).
"""

from __future__ import annotations

# The C modules under signal and pickle: their Python wrappers import enum, re and
# more, and everything a template imports is copied (page tables at every fork) and
# torn down (at every child's exit). Measured with -X importtime and the maximum RSS
# next to what a template imports anyway: pickle and signal cost about 3 ms of each
# template's start-up and 0.5 MiB of its memory (most of it re, which pickle imports).
import _pickle
import _signal  # type: ignore[import-not-found]
import fcntl
import os
import select
import socket
import sys

from . import _child, _wire
from ._child import Terminate
from ._wire import close_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, NoReturn

_REQUEST_ANCILLARY_SIZE = socket.CMSG_SPACE(4 * 4)


class ChannelClosed(Exception):
    """The owner's end of the channel is gone."""


class Link:
    """A template's channel: a Unix socket, or a pair of pipes that carry no fds."""

    def __init__(self, sock: socket.socket | None, read_fd: int = -1, write_fd: int = -1):
        self.sock = sock
        self.carries_fds = sock is not None
        self.read_fd = sock.fileno() if sock is not None else read_fd
        self.write_fd = write_fd

    def receive(self, reader: _wire.FrameReader) -> int:
        if self.sock is not None:
            return reader.receive(self.sock)
        return reader.receive_fd(self.read_fd)

    def send(self, segments: list[_wire.Segment]) -> None:
        if self.sock is not None:
            _wire.send_blocking(self.sock, segments)
            return
        for buffers, fds in segments:
            close_all(fds)
            if fds:
                raise ValueError("this channel cannot carry file descriptors")
            for buffer in buffers:
                view = memoryview(buffer)
                while view:
                    view = view[os.write(self.write_fd, view) :]

    def close(self) -> None:
        """Raw closes: the objects that held the descriptors die unused in a new process."""
        close_all([self.sock.detach()] if self.sock is not None else [self.read_fd, self.write_fd])


class Server:
    """One template: its channel, its queue, and the processes it made."""

    current: ClassVar[Server | None] = None  # this process's: the child-side API's way in

    def __init__(self, channel: Link, queue: list[Any], state: _child.ProcessState) -> None:
        self.channel = channel
        self.queue = queue
        self.state = state
        self.reader = _wire.FrameReader()
        self.pid = os.getpid()
        self.children: dict[int, int] = {}  # pid -> id of the command that made it
        self.theirs: set[int] = set()  # children that code run in the template made
        self.machinery: list[int] = []  # wakeup pipe, group guard: see become_template
        self.poller = select.poll()
        self.poller.register(channel.read_fd, select.POLLIN)
        # SERVE_FORKS: the request socket, and for each template forked on request
        # the pipe to close once it is reaped.
        self.forks: socket.socket | None = None
        self.reaped: dict[int, int] = {}

    def reply(self, op: int, id: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        try:
            self.channel.send(_wire.encode(op, id, payload, fds or ()))
        except OSError as exc:
            raise ChannelClosed from exc

    def become_template(self) -> None:
        """Get ready to fork: reap promptly, adopt orphans, lead a guarded process group.

        The guard: a socketpair only we hold, each end set to SIGKILL the group when
        the other closes. However we end, nothing we orphaned stays (unless it left
        the group, by setsid say). The kernel holds the group itself, not its id.
        """
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.poller.register(read_end, select.POLLIN)
        _child.prctl(_child.PR_SET_CHILD_SUBREAPER, 1)
        if os.getpgrp() != self.pid:
            os.setpgid(0, 0)
        self.machinery = [read_end, write_end, *(end.detach() for end in socket.socketpair())]
        for fd in self.machinery[2:]:
            fcntl.fcntl(fd, fcntl.F_SETOWN, -self.pid)
            fcntl.fcntl(fd, fcntl.F_SETSIG, _signal.SIGKILL)
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_ASYNC)

    def serve(self) -> None:
        """Serve commands until end of file, SIGTERM or a broken channel."""
        try:
            while True:
                frame = self.reader.next_frame()
                if frame is not None:
                    self.handle(frame)
                    continue
                for fd, _ in self.poller.poll():
                    if self.forks is not None and fd == self.forks.fileno():
                        self.fork_on_request()
                    elif fd != self.channel.read_fd:
                        self.reap()
                    elif not self.channel.receive(self.reader):
                        return
        except (Terminate, ChannelClosed, ConnectionError):
            return

    def handle(self, frame: _wire.Frame) -> None:
        op, id = frame.op, frame.id
        try:
            if frame.fds_lost:
                raise OSError(
                    "file descriptors were lost in transit: the kernel truncated the "
                    "control message (is RLIMIT_NOFILE too low?)"
                )
            if op in (_wire.FORK, _wire.SPAWN):
                return self.fork(frame)  # answered by FORKED, or by the child itself
            if op == _wire.HELLO:
                return self.hello(id)
            if op == _wire.KILL:  # not answered
                for pid in [pid for pid, made_by in self.children.items() if made_by == id]:
                    os.kill(pid, _signal.SIGKILL)  # not reaped yet: the pid is not recycled
                return
            # The processes that the owner's code starts here are that code's to wait
            # for (reap() leaves them); of the threads it leaves, the owner is told.
            children, threads = list_children(), count_threads()
            try:
                if op == _wire.REQUIRE:
                    for name in _pickle.loads(frame.payload):
                        __import__(name)
                elif op == _wire.EVAL:
                    self.state.eval(*_pickle.loads(frame.payload))
                elif op == _wire.ARGS:
                    self.queue.extend(_child.loads(frame.payload, frame.fds))
                elif op == _wire.FDS:
                    self.queue.extend(frame.fds)
                elif op == _wire.INVOKE:
                    function, args = _pickle.loads(frame.payload)
                    function(*args)
                elif op == _wire.SERVE_FORKS:
                    self.serve_forks(frame.fds)
                else:
                    raise ValueError(f"unknown command {op}")
            finally:
                self.theirs |= list_children() - children
        except (Terminate, ChannelClosed):
            raise
        except BaseException as exc:
            close_all(frame.fds)
            self.state.settle()
            self.state.show_sources()
            self.reply(_wire.ERROR, id, _wire.error_payload(exc))
        else:
            self.state.settle()
            warning = ""
            if threads == 1 and (threads := count_threads()) > 1:
                warning = (
                    f"template {self.pid} runs {threads - 1} other thread(s) after this command: "
                    "a process forked from it may hang on a lock one held; keep templates "
                    "single-threaded"
                )
            self.reply(_wire.OK, id, warning.encode())

    def hello(self, id: int, pidfd: bool = True) -> None:
        """READY with our pid (and a pidfd): asked by HELLO, or unasked (id 0)."""
        fds = [os.pidfd_open(os.getpid())] if pidfd and self.channel.carries_fds else []
        identity = _wire.IDENTITY.pack(os.getpid(), *sys.version_info[:2])
        self.reply(_wire.READY, id, identity, fds)

    def fork(self, frame: _wire.Frame) -> None:
        """FORK (a new template) or SPAWN (a child running a target)."""
        fds, spawn = frame.fds, frame.op == _wire.SPAWN
        if not fds or (not spawn and len(fds) != 1):
            raise ValueError("FORK takes one socket, SPAWN a socket and the target's fds")
        _wire.flush_stdio()
        pid = fork()
        if pid == 0:
            self.in_new_process(fds, frame.payload if spawn else None)
        # Little to do here: until the child exits, every page this process writes
        # is copied.
        close_all(fds)
        fds.clear()
        self.children[pid] = frame.id
        if not spawn:
            self.reply(_wire.FORKED, frame.id, _wire.PID.pack(pid), [os.pidfd_open(pid)])

    def serve_forks(self, fds: list[int]) -> None:
        if len(fds) != 1 or self.forks is not None:
            raise ValueError("SERVE_FORKS takes one socket, once")
        requests = socket.socket(fileno=fds.pop())
        if requests.type != socket.SOCK_SEQPACKET:
            requests.close()
            raise ValueError("SERVE_FORKS needs a SOCK_SEQPACKET socket")
        self.forks = requests
        self.poller.register(requests, select.POLLIN)

    def fork_on_request(self) -> None:
        assert self.forks is not None
        try:
            data, ancdata, flags, _ = self.forks.recvmsg(
                1, _REQUEST_ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return
        fds = _wire.parse_ancillary(ancdata)
        if not data and not fds:
            # Every requester is gone: stay a template, just stop listening.
            self.poller.unregister(self.forks)
            self.forks.close()
            self.forks = None
            return
        if len(fds) != 2 or flags & socket.MSG_CTRUNC:
            close_all(fds)  # not a request we can answer; closing what came tells
            return
        channel, reaped = fds
        _wire.flush_stdio()
        try:
            pid = fork()
        except OSError as exc:
            # The requester waits on the new channel: tell it there.
            with socket.socket(fileno=channel) as sock:
                _wire.report(sock, _wire.ERROR, exc)
            os.close(reaped)
            return
        if pid == 0:
            os.close(reaped)
            self.in_new_process([channel], None, announce=True)
        os.close(channel)
        # Not in self.children: nobody reads our channel for its exit status. The
        # requester reads it from this pipe, which closes once the process is reaped.
        self.reaped[pid] = reaped

    def in_new_process(
        self, fds: list[int], payload: bytes | None, announce: bool = False
    ) -> NoReturn:
        code = 1
        try:
            # A child dies with its template. A new template shuts down instead, so
            # that it still kills and reaps everything below it (see on_sigcont).
            _child.prctl(_child.PR_SET_PDEATHSIG, _signal.SIGKILL if payload else _signal.SIGCONT)
            if os.getppid() != self.pid:
                _child.exit(1)
            self.state.parent = self.pid
            _signal.set_wakeup_fd(-1)
            # Nothing of the template's machinery may leak into the new process.
            self.channel.close()
            close_all([*self.machinery, *self.reaped.values()])
            if self.forks is not None:
                os.close(self.forks.detach())
            self.reader.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fds[0])
            if payload is not None:
                code = _child.run(sock, self.queue, payload, fds[1:], self.state)
            else:
                _child.set_title(f"tmpl of {self.pid}")
                server = Server.current = Server(Link(sock), list(self.queue), self.state)
                server.become_template()
                if announce:
                    server.hello(0)
                server.serve()
                server.shutdown()
                code = 0
        except (Terminate, ChannelClosed):
            code = 0  # ended, or its requester gone, before it served anything
        except BaseException as exc:
            _child.print_exception(exc, self.state)
        finally:
            _child.exit(code)

    def reap(self) -> None:
        """Reap what we forked and the orphans we adopted, not what our code started."""
        try:
            while os.read(self.machinery[0], 512):
                pass
        except BlockingIOError:
            pass
        if self.state.reap_theirs:
            self.theirs.clear()  # that code asked the kernel to reap its processes
        while not self.theirs:
            # No process of our code's to leave alone: whatever ended is ours to reap,
            # without listing /proc (a third of a spawn's cost in the template).
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self.ended(pid, status)
        self.theirs &= (children := list_children())
        for pid in children - self.theirs:
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # a thread of our code's reaped it
            if reaped:
                self.ended(pid, status)

    def ended(self, pid: int, status: int) -> None:
        """Tell whoever waits for ``pid`` how it ended."""
        code = os.waitstatus_to_exitcode(status)
        if pid in self.children:
            self.reply(_wire.EXITED, self.children.pop(pid), _wire.EXIT_STATUS.pack(code))
        if pid in self.reaped:
            # The requester learns the exit status, then (end of file) that it is gone.
            try:
                os.write(self.reaped[pid], _wire.EXIT_STATUS.pack(code))
            except OSError:
                pass
            os.close(self.reaped.pop(pid))

    def shutdown(self) -> None:
        """Kill and reap everything below this process."""
        self.state.shutting_down = True
        self.reader.close()
        killed: set[int] = set()
        while True:
            # Orphans below us are adopted as they appear, so look again each time.
            for pid in (list_children() | self.children.keys()) - killed:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.add(pid)
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


def list_children() -> set[int]:
    """The pids of this process's children."""
    children: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as file:
                children.update(int(pid) for pid in file.read().split())
        except OSError:
            pass
    return children


def count_threads() -> int:
    """The threads this process's Python code started.

    Not the kernel's count: C libraries' thread pools (OpenBLAS's, started by
    ``import numpy``) handle fork themselves, with ``pthread_atfork``.
    """
    threading = sys.modules.get("threading")
    return len(threading.enumerate()) if threading is not None else 1


def fork() -> int:
    """``os.fork()`` without Python's warning about threads (the owner had ours).

    On 3.15, when warnings are errors, it raises after the child exists, pid unknown;
    and from 3.12 it counts 20 threads in a process whose title has spaces. The filter
    stays first in this process's filters rather than a ``catch_warnings()`` around
    each fork: restoring the filters after the fork writes to pages that the child
    shares, which cost about 50 us of the template's 600 us of CPU a spawn (3.11).
    Its message names this pid, so it is inert in the children that inherit it.
    """
    import warnings

    message = rf"This process \(pid={os.getpid()}\)"
    first = warnings.filters[0] if warnings.filters else None
    if first is None or first[1] is None or first[1].pattern != message:
        warnings.filterwarnings("ignore", message, DeprecationWarning)
    return os.fork()


def align(path: list[str], cwd: str, environ: dict[str, str]) -> None:
    """Make a forked template what ``open_template`` would start now (see INVOKE)."""
    sys.path[:] = path
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)


def start(channel: str, owner: int, sigint_blocked: bool) -> None:
    """Serve the channel ``"socket:FD"`` or ``"pipes:READ:WRITE"`` (see ``_boot``)."""
    kind, _, where = channel.partition(":")
    if kind == "socket":
        main(Link(socket.socket(fileno=int(where))), owner, sigint_blocked)
        return
    read_fd, write_fd = (os.dup(int(fd)) for fd in where.split(":"))
    # A stream on the standard descriptors (an ssh session): what children write to
    # their stdout must not land in the middle of the channel's frames.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    main(Link(None, read_fd, write_fd), owner, sigint_blocked)


def main(channel: Link, owner: int, sigint_blocked: bool) -> None:
    """Serve ``channel`` as a template, for ``owner`` (0: any parent; see ProcessState)."""
    state = _child.ProcessState(sigint_blocked)
    server = Server.current = Server(channel, [], state)
    try:
        try:
            # If the owner dies, even while this template runs a long command or is
            # stopped: shut down as when it closes the channel (see on_sigcont).
            _child.prctl(_child.PR_SET_PDEATHSIG, _signal.SIGCONT)
            _child.set_title(f"tmpl of {os.getppid()}")
            if owner and os.getppid() != owner:
                raise Terminate
            if channel.carries_fds:
                server.become_template()
            state.settle()
            server.hello(0, pidfd=False)  # the owner made us: it has a pidfd
            server.serve()
        finally:
            # The owner closes the channel and then sends SIGTERM: a SIGTERM that
            # lands after serve() returned must be caught here too.
            state.shutting_down = True
    except (Terminate, ChannelClosed):
        pass
    server.shutdown()
    _wire.flush_stdio()
