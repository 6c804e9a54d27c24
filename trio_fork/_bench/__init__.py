"""``python -m trio_fork bench``: trio_fork against the floor, raw fork and the peers.

The measuring code lives in the package so that it runs wherever trio_fork is
installed; ``bench/README.md`` in the source tree says how to run and reproduce it.
"""

from __future__ import annotations

import json
import sys

import anyio

from ._plot import draw, plot_problem
from ._progress import Progress
from ._report import Settings
from ._runner import run_bench, total_steps
from ._table import render

__all__ = ["plot_problem", "run"]


def run(*, quick: bool, as_json: bool, plot: str | None, backend: str, rounds: int | None) -> int:
    """Run the bench and print its table (or JSON) on stdout; progress goes to stderr."""
    settings = Settings.for_mode(quick=quick, backend=backend, rounds=rounds)
    progress = Progress(sys.stderr, total_steps(settings))
    report = anyio.run(run_bench, settings, progress, backend=backend)
    if plot is not None:
        progress.show(f"drawing {plot}")
        draw(report, plot)
    progress.finish()
    if as_json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return 0
