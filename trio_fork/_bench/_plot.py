"""``--plot``: spawn rate against the size of the parent process, with matplotlib."""

from __future__ import annotations

import importlib.util

from ._report import BALLASTS_MB, Report, ballast_key, ballast_name

# Row, legend, marker and line, colour, and where the figures go (points from the
# marker), staggered because the series can run close together.
_SERIES = (
    ("os_fork", "os.fork() of the parent", "o-", "tab:red", (6, -16)),
    ("trio_fork_seq", "trio_fork spawn, one at a time", "s-", "tab:blue", (6, -5)),
    ("trio_fork_32", "trio_fork spawn, 32 at a time", "^-", "tab:green", (6, 6)),
)


def plot_problem() -> str | None:
    """Why ``--plot`` cannot work, checked before a long run; None if it can.

    Only looked up, not imported: importing matplotlib here would grow the very
    process whose fork the bench times.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'trio_fork[bench]'"
    return None


def draw(report: Report, path: str) -> None:
    """Save a PNG of spawn rate against parent size, with the floor for reference."""
    # The object-oriented API, without pyplot: no GUI backend, no global state.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    ticks: dict[float, str] = {}
    for base, label, style, colour, offset in _SERIES:
        points = []
        for megabytes in BALLASTS_MB:
            row = report.row(ballast_key(base, megabytes))
            if row.value is not None and row.parent_rss is not None:
                x = row.parent_rss / 2**20
                points.append((x, row.value))
                ballast = f"+ {ballast_name(megabytes)}" if megabytes else "no ballast"
                ticks.setdefault(x, f"{x:,.0f} MiB\n({ballast})")
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        axes.plot(xs, ys, style, color=colour, label=label)
        for x, y in points:
            axes.annotate(f"{y:,.0f}/s", (x, y), textcoords="offset points", xytext=offset)
    floor = report.row("floor").value
    if floor is not None:
        axes.axhline(
            floor, linestyle="--", color="grey", label=f"floor: a minimal Python ({floor:,.0f}/s)"
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    low, high = axes.get_ylim()
    # Room for the figures written below the lowest point and above the highest.
    axes.set_ylim(low / 1.6, high * 1.3)
    axes.set_xticks(list(ticks), list(ticks.values()))
    axes.minorticks_off()
    axes.set_xlabel("resident size of the parent process")
    axes.set_ylabel("new processes per second (median)")
    machine = report.machine
    axes.set_title(
        f"Spawn rate against parent size: {report.settings.mode} run, "
        f"{machine.get('usable_cpus')} CPUs, load average {report.load_before[0]:.2f} "
        f"before, {report.load_after[0]:.2f} after"
    )
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
