"""``python -m trio_fork bench``: trio_fork against the floor, raw fork and the peers.

The measuring code lives in the package so that it runs wherever trio_fork is
installed; ``bench/README.md`` in the source tree says how to run and reproduce it.
"""

from __future__ import annotations

import json as json_module
import os
import sys

import anyio

from ._plot import draw, plot_problem
from ._progress import Progress
from ._report import Settings
from ._runner import run_bench, total_steps
from ._table import render

__all__ = ["output_problem", "plot_problem", "run"]


def output_problem(option: str, path: str) -> str | None:
    """Why ``option`` cannot write ``path``, checked before a long run; None if it can."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"{option}: the directory {directory!r} does not exist"
    if not os.access(directory, os.W_OK):
        return f"{option}: the directory {directory!r} is not writable"
    return None


def run(
    *, quick: bool, json: str | None, plot: str | None, backend: str, rounds: int | None
) -> int:
    """Run the bench; progress goes to stderr.

    Args:
        json: None to print the table on stdout; ``"-"`` to print JSON there instead;
            a path to write JSON there and still print the table.
        plot: A path for a PNG of spawn rate against parent size.
    """
    settings = Settings.for_mode(quick=quick, backend=backend, rounds=rounds)
    progress = Progress(sys.stderr, total_steps(settings))
    report = anyio.run(run_bench, settings, progress, backend=backend)
    if plot is not None:
        progress.show(f"drawing {plot}")
        draw(report, plot)
    progress.finish()
    if json != "-":
        sys.stdout.write(render(report))
    if json is not None:
        document = json_module.dumps(report.to_json(), indent=2) + "\n"
        if json == "-":
            sys.stdout.write(document)
        else:
            with open(json, "w") as file:
                file.write(document)
    return 0
