"""The bench's results as a text table for people."""

from __future__ import annotations

from collections.abc import Callable

from ._report import Kind, Report, RowResult

# Each section: the kinds of row in it, its title, and whether its rows are process
# starts (which get a ratio to the floor and the size of the process that forked).
_SECTIONS = (
    ((Kind.SPAWNS,), "New processes per second: start, send one byte back, exit, be reaped", True),
    ((Kind.CALLS,), "Calls per second to workers that are already running", False),
    ((Kind.LATENCY, Kind.MEMORY), "A worker with numpy imported", False),
)


def _rate(value: float) -> str:
    return f"{value:,.0f}/s" if value >= 100 else f"{value:.1f}/s"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _mebibytes(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _size(value: float) -> str:
    return f"{value / 2**20:.0f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"


_FORMATS: dict[Kind, Callable[[float], str]] = {
    Kind.SPAWNS: _rate,
    Kind.CALLS: _rate,
    Kind.LATENCY: _seconds,
    Kind.MEMORY: _mebibytes,
}


def _cells(report: Report, result: RowResult, *, starts: bool) -> list[str]:
    if result.value is None:
        return [result.row.label, "-", result.note or "no samples"]
    show = _FORMATS[result.row.kind]
    spread = ""
    if len(result.samples) > 1:
        spread = f"{show(min(result.samples))} .. {show(max(result.samples))}"
    cells = [result.row.label, show(result.value), spread]
    if starts:
        versus = report.versus_floor(result.row.key)
        cells.append("" if versus is None else f"{versus:.2f}")
        cells.append("" if result.parent_rss is None else _size(result.parent_rss))
    return cells


def _header(report: Report) -> list[str]:
    settings = report.settings
    machine = report.machine
    cpus = machine.get("usable_cpus")
    memory = machine.get("memory_bytes")
    rounds = f"{settings.rounds} round{'s' if settings.rounds > 1 else ''}"
    return [
        f"trio_fork bench, {settings.mode} mode on {settings.backend}: {rounds}, each rate sample "
        f"at least {settings.sample_seconds:g} s and {settings.min_iterations} iterations",
        f"Python {machine.get('python')}, Linux {machine.get('kernel')}, {cpus} CPUs "
        f"({machine.get('cpu_model')}), "
        f"{_size(memory) if isinstance(memory, int) else '?'} of memory, "
        f"transparent huge pages: {machine.get('transparent_hugepages')}",
        f"Load average {report.load_before[0]:.2f} before the run and "
        f"{report.load_after[0]:.2f} after it; the run took {report.elapsed:.1f} s. "
        "Figures are medians over the rounds (PSS: mean per process).",
    ]


def render(report: Report) -> str:
    """The table: every row, every ratio against the floor, every target."""
    lines = _header(report)
    for kinds, title, starts in _SECTIONS:
        titles = [title, "median", "range", *(["x floor", "parent RSS"] if starts else [])]
        rows = [
            _cells(report, result, starts=starts)
            for result in report.rows
            if result.row.kind in kinds
        ]
        lines += ["", *_align(titles, rows)]
    targets = []
    for result in report.targets():
        requirement = result.target.requirement
        if result.value is None:
            targets.append([result.target.figure, "-", f"{requirement}  {result.note}"])
            continue
        spread = ""
        if len(result.per_round) > 1:
            spread = f"{min(result.per_round):.2f} .. {max(result.per_round):.2f}"
        verdict = "met" if result.met else "MISSED"
        targets.append([result.target.figure, f"{result.value:.2f}", spread, requirement, verdict])
    titles = ["Targets (ratios of the figures above)", "ratio", "in each round", "target", ""]
    lines += ["", *_align(titles, targets)]
    return "\n".join(lines) + "\n"


def _align(titles: list[str], rows: list[list[str]]) -> list[str]:
    """Titles, then indented rows: the first column left-aligned, the others right.

    A short row (a label, "-", then a note) is one that could not be measured; its
    note runs on to the right instead of being aligned.
    """
    rows = [["  " + row[0], *row[1:]] for row in rows]
    full = [titles, *(row for row in rows if len(row) == len(titles))]
    widths = [max(len(row[column]) for row in full) for column in range(len(titles))]
    widths[0] = max([widths[0], *(len(row[0]) for row in rows)])
    lines = []
    for row in [titles, *rows]:
        cells = [f"{row[0]:<{widths[0]}}"]
        if len(row) == len(titles):
            cells += [f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:], strict=True)]
        else:
            cells += [f"{row[1]:>{widths[1]}}", *row[2:]]
        lines.append("  ".join(cells).rstrip())
    return lines
