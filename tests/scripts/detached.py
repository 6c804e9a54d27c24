"""Run a command apart from the test process, for as long as the test process wants it.

``python tests/scripts/detached.py COMMAND...`` returns at once, leaving a supervisor
that runs the command in a session of its own. Neither is a descendant of the caller,
so the suite's checks of ``descendants()`` do not see them. The supervisor prints
"SUPERVISOR_PID COMMAND_PID" on stdout and closes it. When its stdin ends (the caller
closed it, or died) it kills whatever runs below the command, ends the command (SIGTERM,
then SIGKILL after 5 s) and exits; it exits too when the command ends by itself.

Run by path, not as a module: it needs nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys


def _below(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    stat = file.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def main() -> None:
    if os.fork() != 0:
        os._exit(0)
    os.setsid()
    command = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    print(os.getpid(), command.pid, flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    pidfd = os.pidfd_open(command.pid)
    ready, _, _ = select.select([sys.stdin.fileno(), pidfd], [], [])
    if pidfd not in ready:
        for pid in _below(command.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        command.terminate()
        try:
            command.wait(timeout=5)
        except subprocess.TimeoutExpired:
            command.kill()
    command.wait()


if __name__ == "__main__":
    main()
