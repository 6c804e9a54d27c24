"""Import forwarding at the far end of a remote template: modules this host lacks.

A remote template runs the user's own functions without deploying their package:
when an import fails everywhere else, the finder here (:class:`Imports`, last on
``sys.meta_path`` in the template and every process forked from it) asks the relay,
which asks the parent (IMPORT frames) once per module and keeps the answers
(:class:`Questions`); the parent answers with the source of its own module, or None
(:mod:`trio_fork._forwarding`). Each question carries a socket of its own for the
answer, so that any process forked from the template may ask at any time. Standard
library only, like all of the worker side.
"""

from __future__ import annotations

import marshal
import socket
import sys

from . import _wire
from ._wire import close_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_ANCILLARY = socket.CMSG_SPACE(4 * 4)


def answer(reply: int, payload: bytes) -> None:
    with socket.socket(fileno=reply) as sock:
        sock.settimeout(5)  # the asker waits for it; a stopped one is not waited for long
        try:
            sock.sendall(payload)
        except OSError:
            pass


class Questions:
    """The relay's side: questions from the processes here, each module asked once.

    ``ask(request, name)`` sends the parent the question; its answer comes to
    :meth:`answered`.
    """

    def __init__(self, sock: socket.socket, ask: Callable[[int, bytes], None]) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.ask = ask
        self.asked: dict[int, tuple[bytes, int]] = {}  # request -> (name, reply socket)
        self.known: dict[bytes, bytes] = {}

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def take(self) -> bool:
        """Take a question that came; False once every process that could ask is gone."""
        assert self.sock is not None
        try:
            name, ancdata, _, _ = self.sock.recvmsg(1024, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return True
        fds = _wire.parse_ancillary(ancdata)
        if not name and not fds:
            return False
        if len(fds) != 1:
            close_all(fds)
        elif name in self.known:
            answer(fds[0], self.known[name])
        else:
            request = len(self.asked) + 1
            while request in self.asked:
                request += 1
            self.asked[request] = (name, fds[0])
            self.ask(request, name)
        return True

    def answered(self, request: int, payload: bytes) -> None:
        name, reply = self.asked.pop(request, (b"", -1))
        if reply >= 0:
            self.known[name] = payload
            answer(reply, payload)

    def close(self, *, replies: bool = False) -> None:
        """Take no more questions; with ``replies``, drop those still unanswered too."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if replies:
            close_all([reply for _, reply in self.asked.values()])
            self.asked.clear()


class Imports:
    """The finder: modules this host lacks, served by the parent; last on ``sys.meta_path``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.found: dict[str, tuple[bool, str, str]] = {}

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        ours, theirs = socket.socketpair()
        with ours:
            try:
                with theirs:
                    self.sock.sendmsg([name.encode()], _wire.ancillary([theirs.fileno()]))
                data = b"".join(iter(lambda: ours.recv(1 << 16), b""))
            except OSError:
                return None
        found = marshal.loads(data) if data else None
        if not found:
            return None
        self.found[name] = found
        spec = type(sys.__spec__)(name, self, origin=found[2])  # type: ignore[arg-type]
        spec.submodule_search_locations = [] if found[0] else None
        return spec

    def create_module(self, spec: object) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        _, source, filename = self.found[module.__name__]
        exec(compile(source, filename, "exec"), vars(module))

    def get_source(self, name: str) -> str:
        return self.found[name][1]
