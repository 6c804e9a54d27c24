"""A run in progress, as the server sees it: the client's signals go on to the program.

The client stands in for the program (:mod:`trio_fork._zygote_client`): what it is
sent, it passes on as one byte per signal on its connection, and the server, which
holds the program's pidfd, delivers it as the terminal or ``kill`` would have
delivered it to a program that ``python`` had started. The client's connection also
says when it is gone: then the program goes too.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import TYPE_CHECKING

import anyio

from ._process import readable
from ._zygote_client import SIGNALS, TERMINAL_SIGNALS

if TYPE_CHECKING:
    from ._zygote_generation import Spare


async def until_exit(conn: socket.socket, spare: Spare) -> int:
    """The program's exit status; meanwhile, pass on the client's signals.

    The client sends a byte for each signal it gets, and a 0 when it leaves because
    the program said it ends: an end of file before that means that the client is
    gone (killed, even by SIGKILL), and the program is killed.
    """
    child = spare.child
    async with anyio.create_task_group() as group:

        async def serve_client() -> None:
            while True:
                await anyio.wait_readable(conn)
                try:
                    data = conn.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if readable(spare.pidfd):
                    return  # it has exited already
                for sig in data or [signal.SIGKILL]:
                    if sig == 0:
                        # The client heard the program's last word and leaves: what
                        # the program started and left running lives on, as after python.
                        return
                    if sig in SIGNALS or sig == signal.SIGKILL:
                        _deliver(spare, sig)
                    if sig == signal.SIGTSTP:
                        # The client stops itself once its program is stopped, as the
                        # shell expects of its job (and SIGCONT wakes them both).
                        try:
                            conn.send(b"S\0\0\0\0")
                        except OSError:
                            pass  # gone: the end of file comes next
                if not data:
                    return

        group.start_soon(serve_client)
        status = await child.wait()
        group.cancel_scope.cancel()
    return status


def _deliver(spare: Spare, sig: int) -> None:
    """Signal the program as its client was signalled, as a terminal would have."""
    try:
        if sig in TERMINAL_SIGNALS or sig == signal.SIGKILL:
            # Its process group, as a terminal signals a job's: the pid names the group
            # until the program is reaped, which it is not while its pidfd is not
            # readable.
            try:
                os.killpg(spare.child.pid, sig)
                if sig != signal.SIGKILL:
                    return
            except ProcessLookupError:
                pass  # it left the group
        signal.pidfd_send_signal(spare.pidfd, sig)
    except (ProcessLookupError, PermissionError):
        pass
