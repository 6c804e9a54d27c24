"""The loop that the floor and the raw ``os.fork()`` rows time.

Fork, the child sends one byte on a socketpair and exits with ``os._exit``, the parent
reads the byte and reaps the child. It is the least work a process can do to start a
worker that reports back, so every other row is measured against it.

Standard library only, and runnable as a script: the floor runs this file in its own
minimal interpreter (``python -I -S _forkloop.py SECONDS MINIMUM``), while the raw
``os.fork()`` rows call :func:`fork_loop` in the bench process itself, so that both
time exactly the same code.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def fork_loop(seconds: float, minimum: int) -> tuple[int, float]:
    """Run the loop for at least ``seconds`` and ``minimum`` rounds: (rounds, elapsed)."""
    count = 0
    start = time.perf_counter()
    while True:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                theirs.send(b"x")
                code = 0
            finally:
                # Whatever happens, the child must never return into the loop.
                os._exit(code)
        theirs.close()
        byte = ours.recv(1)
        ours.close()
        _, status = os.waitpid(pid, 0)
        if byte != b"x" or status != 0:
            raise RuntimeError(f"forked child {pid} failed (status {status}, sent {byte!r})")
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= minimum:
            return count, elapsed


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


if __name__ == "__main__":
    fork_loop(0.0, 1)  # warm-up, as the bench does for every other row
    rounds, seconds = fork_loop(float(sys.argv[1]), int(sys.argv[2]))
    print(rounds, seconds, resident_bytes())
