"""The rows of ``trio_fork run``: a program started by a preloaded server, against python.

Each sample times whole commands, as a user at a shell would wait for them: from
starting the command to its exit. ``trio_fork run`` is the installed ``trio-fork``
script, its servers warm (started, and used twice, before any sample); ``python``
runs the same script. The numpy script imports numpy and prints one line; the empty
script is empty, so that ``trio_fork run`` of it against ``python -c pass`` is what
the client itself costs. The concurrent rows start 20 commands at once and time
until the last has exited.

The servers run in a runtime directory of the bench's own, and are stopped when the
bench ends (else they would end after an hour without runs). The package's bytecode
is written first, as an installer does: an editable install has none, and with
``PYTHONDONTWRITEBYTECODE`` set every command would compile the client anew (about 4
ms a run, half of what ``python -c pass`` costs).
"""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

from ._measure import Sampler, Unavailable, median_latency
from ._numpy import check_numpy

if TYPE_CHECKING:
    from ._report import Settings

CONCURRENT = 20
"""Commands started at once by the concurrent rows."""
_NUMPY_SCRIPT = "import numpy\nprint(numpy.arange(10).sum())\n"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = {
    "numpy_run": ("numpy_line.py", True, 1),
    "numpy_python": ("numpy_line.py", False, 1),
    "run_empty": ("empty.py", True, 1),
    "python_pass": (None, False, 1),
    "numpy_run_20": ("numpy_line.py", True, CONCURRENT),
    "numpy_python_20": ("numpy_line.py", False, CONCURRENT),
}
"""Row key -> (script, whether through trio_fork run, how many at once)."""


def _script() -> str:
    path = os.path.join(sysconfig.get_path("scripts"), "trio-fork")
    if not os.access(path, os.X_OK):
        raise Unavailable(
            f"the trio-fork script is not installed at {path} (pip install trio_fork)"
        )
    return path


@contextmanager
def _place() -> Iterator[tuple[str, dict[str, str]]]:
    """A directory with the scripts and the servers' sockets, and the commands' environment."""
    # Short, under /tmp: a socket's path may hold 107 bytes at most.
    directory = tempfile.mkdtemp(prefix="tfb-", dir="/tmp")
    with open(os.path.join(directory, "numpy_line.py"), "w") as file:
        file.write(_NUMPY_SCRIPT)
    with open(os.path.join(directory, "empty.py"), "w"):
        pass
    path = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XDG_RUNTIME_DIR": directory, "PYTHONPATH": path}
    try:
        yield directory, env
    finally:
        command = [sys.executable, "-m", "trio_fork", "serve", "--stop", "--all"]
        subprocess.run(command, env=env, cwd=directory, capture_output=True, check=False)
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def command_rows(settings: Settings, key: str) -> AsyncIterator[Sampler]:
    """Row ``key`` of :data:`ROWS`: its command, warmed up, timed whole."""
    script, through_run, count = ROWS[key]
    if script == "numpy_line.py":
        await check_numpy()
    if script is None:
        command = [sys.executable, "-c", "pass"]
    elif through_run:
        preload = ["--preload=numpy"] if script == "numpy_line.py" else []
        command = [_script(), "run", *preload, script]
    else:
        command = [sys.executable, script]
    compileall.compile_dir(os.path.join(_ROOT, "trio_fork"), quiet=2)
    with _place() as (directory, env):

        def once() -> float:
            # Blocking, as the other rows of whole processes: no thread in the bench.
            start = time.perf_counter()
            processes = [
                subprocess.Popen(command, cwd=directory, env=env, stdout=subprocess.DEVNULL)
                for _ in range(count)
            ]
            codes = [process.wait() for process in processes]
            elapsed = time.perf_counter() - start
            if any(codes):
                raise RuntimeError(f"{command} exited with status {codes}")
            return elapsed

        async def timed() -> float:
            return once()

        async def sample() -> float:
            return await median_latency(timed, settings.sample_seconds)

        # Starts the server; the second run finds it warm, with its spares forked.
        once()
        once()
        yield sample
