"""One template per test, forked from a session-wide one, checked for leftovers.

What the ``fork_template`` fixture does, without pytest: the benchmarks time it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

from ._handle import TemplateHandle
from ._process import descendants
from ._template import Template


@final
class LeftoverProcessesError(Exception):
    """Processes were still running below a test's template when the test ended."""


@asynccontextmanager
async def open_isolated_template(
    handle: TemplateHandle, preload: list[str]
) -> AsyncIterator[Template]:
    """A template forked from ``handle`` for the block, as open_template would start it now.

    Raises:
        LeftoverProcessesError: The block ended normally, but processes it started
            outlived the blocks that started them (a worker's own children, say).
            They have been killed by then, with the template.
    """
    async with handle._open_aligned(preload, None, None) as template:
        yield template
        # Spawn and fork blocks wait for their process: what is below the template
        # now was left behind, and the template (a subreaper) adopted it.
        leftovers = [_describe(pid, template.pid) for pid in descendants(template.pid)]
    if leftovers:
        raise LeftoverProcessesError(
            f"{len(leftovers)} process(es) started by the test outlived the block that "
            "started them, and were killed at teardown:\n"
            + "\n".join(f"  {leftover}" for leftover in leftovers)
        )


def _describe(pid: int, template: int) -> str:
    command = _command_line(pid)
    if command is None:
        return f"pid {pid} (already gone)"
    if not command:  # a zombie's, or a process's between its exec and its new program
        return f"pid {pid} (no command line: exiting, or starting a program)"
    if command == _command_line(template):
        # Forked, never exec'd: its command line is the template's, and says nothing.
        return f"pid {pid} (a Python process forked below the template)"
    return f"pid {pid}: {command}"


def _command_line(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            words = file.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return None
    line = " ".join(word.decode(errors="replace") for word in words)
    return line if len(line) <= 120 else line[:117] + "..."
