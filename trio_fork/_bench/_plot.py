"""``--plot``: spawn rate against the size of the parent process, with matplotlib."""

from __future__ import annotations

import importlib.util
import os

from ._report import BALLASTS_MB, Report, ballast_key, ballast_name

_SERIES = (
    ("os_fork", "os.fork() of the parent", "o-", "tab:red"),
    ("trio_fork_seq", "trio_fork spawn, one at a time", "s-", "tab:blue"),
    ("trio_fork_32", "trio_fork spawn, 32 at a time", "^-", "tab:green"),
)


def plot_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot work, checked before a long run; None if it can."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'trio_fork[bench]'"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"--plot: the directory {directory!r} does not exist"
    if not os.access(directory, os.W_OK):
        return f"--plot: the directory {directory!r} is not writable"
    return None


def draw(report: Report, path: str) -> None:
    """Save a PNG of spawn rate against parent size, with the floor for reference."""
    # The object-oriented API, without pyplot: no GUI backend, no global state.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    for base, label, style, colour in _SERIES:
        points = [report.row(ballast_key(base, megabytes)) for megabytes in BALLASTS_MB]
        xs = [row.parent_rss / 2**20 for row in points if row.value and row.parent_rss]
        ys = [row.value for row in points if row.value and row.parent_rss]
        axes.plot(xs, ys, style, color=colour, label=label)
        for x, y in zip(xs, ys, strict=True):
            axes.annotate(f"{y:,.0f}/s", (x, y), textcoords="offset points", xytext=(4, 6))
    floor = report.row("floor").value
    if floor is not None:
        axes.axhline(floor, linestyle="--", color="grey", label="floor: a minimal Python forking")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(
        "resident size of the parent process (MiB); ballast "
        + ", ".join(ballast_name(megabytes) for megabytes in BALLASTS_MB)
    )
    axes.set_ylabel("new processes per second")
    machine = report.machine
    axes.set_title(
        f"Spawn rate against parent size ({report.settings.mode} run, "
        f"{machine.get('usable_cpus')} CPUs, load {report.load_before[0]:.2f})"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
