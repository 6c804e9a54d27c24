"""Benchmarks of the test fixture and of Early, as plain functions.

Each ``measure_*`` function runs one measurement in a fresh event loop and returns a
:class:`Figure`; :func:`figures` runs them all and :func:`main` prints them. They live
in the package, not under ``bench/``, so that ``python -m trio_fork bench`` can list
them with the others; ``bench/fixtures.py`` runs them on their own.

What is timed is the code the user's process runs: the ``fork_template`` fixture's
set-up and teardown are :func:`~trio_fork._isolated.open_isolated_template` entered
and left, without pytest's own bookkeeping around it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import attrs

from ._handle import start_early, start_template, stop_early
from ._isolated import open_isolated_template
from ._template import open_template

# What a test suite's session template typically imports: an async stack and some
# of the standard library. Both fixtures compared import the same.
SUITE_PRELOAD = ("anyio", "trio", "json", "decimal", "email.message", "http.client")


@attrs.frozen
class Figure:
    """One measurement: its samples in seconds, and the target it is held to."""

    name: str
    samples: tuple[float, ...]
    target: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@attrs.frozen
class Ratio:
    """How many times faster ``fast`` is than ``slow``, by median."""

    name: str
    slow: Figure
    fast: Figure
    target: str = ""

    @property
    def value(self) -> float:
        return self.slow.median / self.fast.median


async def _time(runs: int, once: Callable[[], Awaitable[None]]) -> tuple[float, ...]:
    await once()  # warm-up: first imports, first page faults
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await once()
        samples.append(time.perf_counter() - started)
    return tuple(samples)


def measure_fork_template(
    runs: int = 30, preload: Sequence[str] = SUITE_PRELOAD, backend: str = "trio"
) -> Figure:
    """``fork_template`` set-up and teardown, the session template already started."""
    with start_template(preload=preload) as handle:

        async def once() -> None:
            async with open_isolated_template(handle, []):
                pass

        samples = anyio.run(_time, runs, once, backend=backend)
    return Figure("fork_template fixture: set-up + teardown", samples, "<= 20 ms")


def measure_fresh_template_fixture(
    runs: int = 10, preload: Sequence[str] = SUITE_PRELOAD, backend: str = "trio"
) -> Figure:
    """A fixture that starts a template of its own for each test: open_template()."""

    async def once() -> None:
        async with open_template(preload):
            pass

    samples = anyio.run(_time, runs, once, backend=backend)
    return Figure("fixture starting a fresh template per test", samples)


def measure_open_template(runs: int = 10, early: bool = False, backend: str = "trio") -> Figure:
    """``open_template()`` entered and left, with or without :func:`start_early`."""

    async def once() -> None:
        async with open_template():
            pass

    if not early:
        samples = anyio.run(_time, runs, once, backend=backend)
        return Figure("open_template() without Early", samples)
    start_early()
    try:
        samples = anyio.run(_time, runs, once, backend=backend)
    finally:
        stop_early()
    return Figure("open_template() after start_early()", samples)


def figures(runs: int = 30, backend: str = "trio") -> list[Figure | Ratio]:
    """Every measurement of this module, and the ratios the issue sets targets for."""
    slow_runs = max(1, runs // 3)
    rows: list[Figure | Ratio] = []
    for label, preload in (("preload: a test suite's", SUITE_PRELOAD), ("no preload", ())):
        fixture = measure_fork_template(runs, preload, backend)
        fresh = measure_fresh_template_fixture(slow_runs, preload, backend)
        rows += [
            attrs.evolve(fixture, name=f"{fixture.name} ({label})"),
            attrs.evolve(fresh, name=f"{fresh.name} ({label})"),
            Ratio(f"  fork_template is faster ({label})", fresh, fixture, ">= 10x"),
        ]
    without = measure_open_template(slow_runs, backend=backend)
    with_early = measure_open_template(runs, early=True, backend=backend)
    return [
        *rows,
        without,
        with_early,
        Ratio("  open_template() after Early is faster", without, with_early, ">= 10x"),
    ]


def format_table(rows: Sequence[Figure | Ratio]) -> str:
    lines = []
    for row in rows:
        if isinstance(row, Figure):
            value = f"{row.median * 1e3:8.2f} ms  (n={len(row.samples)})"
        else:
            value = f"{row.value:8.1f} x"
        target = f"  target {row.target}" if row.target else ""
        lines.append(f"{row.name:<72} {value}{target}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks of fork_template and Early.")
    parser.add_argument("--runs", type=int, default=30, help="samples per fast measurement")
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    args = parser.parse_args(argv)
    print(format_table(figures(args.runs, args.backend)))
    return 0
