"""The order in which the bench measures its rows, and the collection of results.

Every row is set up and warmed up first (untimed), then sampled round-robin, one
sample per row per round, so that a change in the machine's load falls on all rows
alike rather than on whichever happened to run at the time. Each round walks the
parent sizes (no ballast, 200 MB, 2 GB) and every other round walks them backwards,
so that a steady drift in load cancels out between the sizes, and the 2 GB ballast
is mapped once per two rounds. The memory rows run last, with no ballast. A few
rows run in helper processes (see ``_helper``), and are sampled in turn all the same.
"""

from __future__ import annotations

import multiprocessing
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from . import _calls, _fixtures, _helper, _numpy, _parity, _peers, _spawns, _zygote
from ._measure import Sampler, Unavailable
from ._report import BALLASTS_MB, ROWS, Kind, Report, RowResult, Settings, ballast_key, ballast_name
from ._system import Ballast, load_average, machine, memory_use, resident_bytes

if TYPE_CHECKING:
    from .._template import Template
    from ._progress import Progress

_ROWS = {row.key: row for row in ROWS}
# Sampled with no ballast only, in the table's order, after the rows sampled at
# every parent size.
_NO_BALLAST_ONLY = tuple(
    row.key for row in ROWS if row.ballast_mb is None and row.kind is not Kind.MEMORY
)
_MEMORY_STEPS = 2


def _plan() -> list[tuple[int, str]]:
    """One round: (ballast in MB, row key) in the order they are sampled."""
    plan = []
    for megabytes in BALLASTS_MB:
        keys = [
            ballast_key("os_fork", megabytes),
            ballast_key("trio_fork_seq", megabytes),
            ballast_key("trio_fork_32", megabytes),
            *_parity.keys_at(megabytes),
        ]
        if megabytes == 0:
            keys += _NO_BALLAST_ONLY
        plan += [(megabytes, key) for key in keys]
    return plan


def total_steps(settings: Settings) -> int:
    """How many steps :func:`run_bench` reports to its progress display."""
    return len(_plan()) * settings.rounds + _MEMORY_STEPS


class _Results:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {row.key: [] for row in ROWS}
        self.notes: dict[str, str] = {}
        self.rss: dict[str, int] = {}

    def rows(self) -> tuple[RowResult, ...]:
        return tuple(
            RowResult(
                row, tuple(self.samples[row.key]), self.notes.get(row.key), self.rss.get(row.key)
            )
            for row in ROWS
        )


def _probe(
    key: str, settings: Settings, template: Template, results: _Results
) -> AbstractAsyncContextManager[Sampler]:
    if key in _helper.HOSTED_ROWS:
        return _helper.hosted(settings, key)
    if key == "floor":

        def floor_rss(rss: int) -> None:
            results.rss["floor"] = rss

        return _spawns.floor(settings, floor_rss)
    if key.startswith("os_fork_"):
        return _spawns.os_fork(settings)
    if key.startswith("trio_fork_seq_"):
        return _spawns.trio_fork_spawns(settings, template, concurrency=1)
    if key.startswith("trio_fork_32_"):
        return _spawns.trio_fork_spawns(settings, template, concurrency=settings.concurrency)
    if key.startswith("exec_"):
        return _parity.run_process_rows(settings, template, key)
    if key == "mp_fork":
        return _peers.multiprocessing_processes(settings, multiprocessing.get_context("fork"))
    if key == "mp_forkserver":
        return _peers.multiprocessing_processes(settings, multiprocessing.get_context("forkserver"))
    if key == "mp_spawn":
        return _peers.multiprocessing_processes(settings, multiprocessing.get_context("spawn"))
    if key in ("trio_parallel_fresh", "trio_parallel_cached"):
        return _peers.trio_parallel_calls(settings, fresh=key == "trio_parallel_fresh")
    if key == "anyio_to_process":
        return _peers.anyio_to_process(settings)
    if key == "trio_fork_run_sync":
        return _calls.run_sync_calls(settings)
    if key == "rpc_pipelined":
        return _calls.pipelined_rpc(settings)
    if key == "numpy_first_spawn":
        return _numpy.first_spawns(settings)
    if key == "numpy_fresh_start":
        return _numpy.fresh_starts(settings)
    if key in _zygote.ROWS:
        return _zygote.command_rows(settings, key)
    if key.startswith("fixture_"):
        preload = _fixtures.SUITE_PRELOAD if key.endswith("_suite") else ()
        if key.startswith("fixture_fork_template"):
            return _fixtures.fork_template_fixture(settings, preload)
        return _fixtures.fresh_template_fixture(settings, preload)
    raise AssertionError(f"no probe for row {key!r}")


async def _sample_rounds(settings: Settings, results: _Results, progress: Progress) -> None:
    plan = _plan()
    async with AsyncExitStack() as stack:
        ballast = stack.enter_context(Ballast())
        template = await stack.enter_async_context(_spawns.spawn_template())
        samplers: dict[str, Sampler] = {}
        for _, key in plan:
            label = _ROWS[key].label
            progress.show(f"setting up {label}")
            try:
                samplers[key] = await stack.enter_async_context(
                    _probe(key, settings, template, results)
                )
            except Unavailable as exc:
                results.notes[key] = f"skipped: {exc}"
                progress.step(f"skipped {label}: {exc}", count=settings.rounds)
        rss = resident_bytes()
        for number in range(1, settings.rounds + 1):
            for megabytes, key in plan if number % 2 else reversed(plan):
                if key not in samplers:
                    continue
                if ballast.megabytes != megabytes:
                    progress.show(f"resizing the ballast to {ballast_name(megabytes)}")
                    ballast.resize(megabytes)
                    rss = resident_bytes()
                progress.step(f"{_ROWS[key].label} (round {number}/{settings.rounds})")
                results.samples[key].append(await samplers[key]())
                # This process is the parent in every row but the floor, which runs
                # in its own interpreter and reports its own size.
                if key != "floor":
                    results.rss[key] = rss
        ballast.resize(0)
        progress.show("closing down the workers, templates and peers")


async def _sample_memory(settings: Settings, results: _Results, progress: Progress) -> None:
    keys = [row.key for row in ROWS if row.kind is Kind.MEMORY]
    try:
        await _numpy.check_numpy()
    except Unavailable as exc:
        for key in keys:
            results.notes[key] = f"skipped: {exc}"
        progress.step(f"skipped the memory rows: {exc}", count=_MEMORY_STEPS)
        return
    count = settings.idle_processes
    progress.step(f"memory of {count} idle children of a numpy template")
    async with _numpy.numpy_template() as template:
        children = await _numpy.idle_children_memory(template, count)
        # Taken while its children live, when its PSS is its share of what they share.
        results.samples["numpy_template_pss"].append(memory_use(template.pid)[0])
    progress.step(f"memory of {count} idle fresh interpreters with numpy")
    fresh = await _numpy.idle_fresh_memory(count)
    for kind, figures in (("child", children), ("fresh", fresh)):
        results.samples[f"numpy_{kind}_pss"] += [pss for pss, _ in figures]
        results.samples[f"numpy_{kind}_uss"] += [uss for _, uss in figures]


async def run_bench(settings: Settings, progress: Progress) -> Report:
    """Measure every row; a row that cannot be measured here says why."""
    results = _Results()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = load_average()
    start = time.perf_counter()
    await _sample_rounds(settings, results, progress)
    await _sample_memory(settings, results, progress)
    return Report(
        settings=settings,
        machine=machine(),
        load_before=load_before,
        load_after=load_average(),
        started=started,
        elapsed=time.perf_counter() - start,
        rows=results.rows(),
    )
