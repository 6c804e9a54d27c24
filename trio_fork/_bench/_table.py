"""The bench's results as a text table for people."""

from __future__ import annotations

from collections.abc import Callable

from ._report import ROW_BY_KEY, SECTIONS, Report, RowResult, TargetResult


def _ratio(value: float) -> str:
    # Two decimals, so that 1.99 does not read as 2.0.
    return f"{value:.2f}"


def _size(value: float) -> str:
    return f"{value / 2**20:.0f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"


def _cells(report: Report, result: RowResult, *, starts: bool) -> list[str]:
    if result.value is None:
        return [result.row.label, "-", result.note or "no samples"]
    show = result.row.kind.show
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
        f"at least {settings.sample_seconds:g} s and {settings.min_iterations} iterations, "
        f"each time sample the median of the calls in at least {settings.sample_seconds:g} s",
        f"Python {machine.get('python')}, Linux {machine.get('kernel')}, {cpus} CPUs "
        f"({machine.get('cpu_model')}), "
        f"{_size(memory) if isinstance(memory, int) else '?'} of memory, "
        f"transparent huge pages: {machine.get('transparent_hugepages')}",
        f"Load average {report.load_before[0]:.2f} before the run and "
        f"{report.load_after[0]:.2f} after it; the run took {report.elapsed:.1f} s. "
        "Figures are medians over the rounds (PSS: mean per process).",
    ]


def _target_cells(result: TargetResult) -> list[str]:
    target = result.target
    if result.value is None:
        return [target.figure, "-", f"{target.requirement}  {result.note}"]
    show: Callable[[float], str] = _ratio
    if target.denominator is None:
        show = ROW_BY_KEY[target.numerator].kind.show
    spread = ""
    if len(result.per_round) > 1:
        spread = f"{show(min(result.per_round))} .. {show(max(result.per_round))}"
    verdict = "met" if result.met else "MISSED"
    return [target.figure, show(result.value), spread, target.requirement, verdict]


def render(report: Report) -> str:
    """The table: every row, every ratio against the floor, every target."""
    lines = _header(report)
    for section in SECTIONS:
        starts = section.starts
        titles = [section.title, "median", "range", *(["x floor", "parent RSS"] if starts else [])]
        rows = [_cells(report, report.row(row.key), starts=starts) for row in section.rows]
        lines += ["", *_align(titles, rows)]
    titles = ["Targets (the figures above, and ratios of them)", "measured", "in each round"]
    targets = [_target_cells(result) for result in report.targets()]
    lines += ["", *_align([*titles, "target", ""], targets)]
    return "\n".join(lines) + "\n"


def _align(titles: list[str], rows: list[list[str]]) -> list[str]:
    """Titles, then indented rows: the first column left-aligned, the others right.

    A row whose figure is "-" (then a note) is one that could not be measured; its
    note runs on to the right instead of being aligned.
    """
    rows = [["  " + row[0], *row[1:]] for row in rows]
    full = [titles, *(row for row in rows if row[1] != "-")]
    widths = [max(len(row[column]) for row in full) for column in range(len(titles))]
    widths[0] = max([widths[0], *(len(row[0]) for row in rows)])
    lines = []
    for row in [titles, *rows]:
        cells = [f"{row[0]:<{widths[0]}}"]
        if row[1] != "-":
            cells += [f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:], strict=True)]
        else:
            cells += [f"{row[1]:>{widths[1]}}", *row[2:]]
        lines.append("  ".join(cells).rstrip())
    return lines
