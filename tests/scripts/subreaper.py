"""Run a command as a child subreaper: what a well-behaved init does for orphans.

``python -m tests.scripts.subreaper COMMAND...`` passes the command's output through,
reaps every process that ends up below it, and when none is left prints one JSON
line: ``{"reaped": {pid: seconds since the command was killed or exited}}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    command = subprocess.Popen(sys.argv[1:])
    reaped: dict[int, float] = {}
    ended: float | None = None
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        now = time.monotonic()
        if pid == command.pid:
            command.returncode = 0  # reaped here, not by Popen
            ended = now
        reaped[pid] = now
    assert ended is not None
    print(json.dumps({"reaped": {pid: at - ended for pid, at in reaped.items()}}), flush=True)


if __name__ == "__main__":
    main()
