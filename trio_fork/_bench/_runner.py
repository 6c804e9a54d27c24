"""The order in which the bench measures its rows, and the collection of results.

Rows run in three groups, one per parent size (no ballast, 200 MB, 2 GB). Within a
group every row is set up and warmed up first, then sampled round-robin, one sample
per row per round, so that a change in the machine's load during the run falls on
all rows of a group alike rather than on whichever happened to run then. The numpy
rows run last, with no ballast.
"""

from __future__ import annotations

import multiprocessing
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import datetime, timezone

from . import _numpy, _peers, _spawns
from ._measure import Sampler, Unavailable
from ._progress import Progress
from ._report import BALLASTS_MB, ROWS, Report, RowResult, Settings, ballast_key, ballast_name
from ._system import allocate_ballast, load_average, machine, proportional_set_size, resident_bytes

_ROWS = {row.key: row for row in ROWS}
_PEERS = (
    "mp_fork",
    "mp_forkserver",
    "mp_spawn",
    "trio_parallel_fresh",
    "trio_parallel_cached",
    "anyio_to_process",
)


def _group(megabytes: int) -> list[str]:
    """The rows measured while this process holds ``megabytes`` of ballast."""
    keys = [ballast_key("os_fork", megabytes)]
    if megabytes == 0:
        keys = ["floor", *keys, *_PEERS]
    return [*keys, ballast_key("trio_fork_seq", megabytes), ballast_key("trio_fork_32", megabytes)]


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


def _probe(key: str, settings: Settings, results: _Results) -> AbstractAsyncContextManager[Sampler]:
    if key == "floor":

        def floor_rss(rss: int) -> None:
            results.rss["floor"] = rss

        return _spawns.floor(settings, floor_rss)
    if key.startswith("os_fork_"):
        return _spawns.os_fork(settings)
    if key.startswith("trio_fork_seq_"):
        return _spawns.trio_fork_spawns(settings, concurrency=1)
    if key.startswith("trio_fork_32_"):
        return _spawns.trio_fork_spawns(settings, concurrency=settings.concurrency)
    if key == "mp_fork":
        return _peers.multiprocessing_processes(settings, multiprocessing.get_context("fork"))
    if key == "mp_forkserver":
        return _peers.multiprocessing_processes(settings, multiprocessing.get_context("forkserver"))
    if key == "mp_spawn":
        return _peers.multiprocessing_processes(settings, multiprocessing.get_context("spawn"))
    if key.startswith("trio_parallel_"):
        return _peers.trio_parallel_calls(settings, fresh=key == "trio_parallel_fresh")
    if key == "anyio_to_process":
        return _peers.anyio_to_process(settings)
    raise AssertionError(f"no probe for row {key!r}")


def _numpy_steps(settings: Settings) -> int:
    # A first spawn and a fresh start per round, then the two PSS measurements.
    return 2 * settings.start_rounds + 2


def total_steps(settings: Settings) -> int:
    """How many steps :func:`run_bench` reports to its progress display."""
    sampled = sum(len(_group(megabytes)) for megabytes in BALLASTS_MB) * settings.rounds
    return sampled + _numpy_steps(settings)


async def _sample_group(
    megabytes: int, settings: Settings, results: _Results, progress: Progress
) -> None:
    where = f"parent + {ballast_name(megabytes)}" if megabytes else "no ballast"
    async with AsyncExitStack() as stack:
        samplers: list[tuple[str, Sampler]] = []
        for key in _group(megabytes):
            label = _ROWS[key].label
            progress.show(f"{where}: setting up {label}")
            try:
                sampler = await stack.enter_async_context(_probe(key, settings, results))
            except Unavailable as exc:
                results.notes[key] = f"skipped: {exc}"
                progress.step(f"skipped {label}: {exc}", count=settings.rounds)
            else:
                samplers.append((key, sampler))
        # This process is the parent of every row but the floor, which runs in its
        # own interpreter and reports its own size.
        rss = resident_bytes()
        for key, _ in samplers:
            if key != "floor":
                results.rss[key] = rss
        for number in range(1, settings.rounds + 1):
            for key, sampler in samplers:
                progress.step(f"{where}: {_ROWS[key].label} (round {number}/{settings.rounds})")
                results.samples[key].append(await sampler())
        progress.show(f"{where}: closing down")


async def _sample_numpy(settings: Settings, results: _Results, progress: Progress) -> None:
    progress.show("numpy: can a template import it?")
    try:
        await _numpy.check_numpy()
    except Unavailable as exc:
        for row in ROWS:
            if row.key.startswith("numpy_"):
                results.notes[row.key] = f"skipped: {exc}"
        progress.step(f"skipped the numpy rows: {exc}", count=_numpy_steps(settings))
        return
    rounds = settings.start_rounds
    for number in range(1, rounds + 1):
        # A new template each round: only a template's first spawn is the point.
        progress.step(f"numpy: {_ROWS['numpy_first_spawn'].label} ({number}/{rounds})")
        async with _numpy.numpy_template() as template:
            results.samples["numpy_first_spawn"].append(await _numpy.first_spawn(template))
        progress.step(f"numpy: {_ROWS['numpy_fresh_start'].label} ({number}/{rounds})")
        results.samples["numpy_fresh_start"].append(await _numpy.fresh_start())
    count = settings.idle_processes
    progress.step(f"numpy: PSS of {count} idle children of a numpy template")
    async with _numpy.numpy_template() as template:
        results.samples["numpy_child_pss"] += await _numpy.idle_children_pss(template, count)
        results.samples["numpy_template_pss"].append(proportional_set_size(template.pid))
    progress.step(f"numpy: PSS of {count} idle fresh interpreters with numpy")
    results.samples["numpy_fresh_pss"] += await _numpy.idle_fresh_pss(count)


async def run_bench(settings: Settings, progress: Progress) -> Report:
    """Measure every row; a row that cannot be measured here says why."""
    results = _Results()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = load_average()
    start = time.perf_counter()
    for megabytes in BALLASTS_MB:
        if megabytes == 0:
            await _sample_group(megabytes, settings, results, progress)
            continue
        progress.show(f"allocating {ballast_name(megabytes)} of ballast")
        with allocate_ballast(megabytes):
            await _sample_group(megabytes, settings, results, progress)
    await _sample_numpy(settings, results, progress)
    return Report(
        settings=settings,
        machine=machine(),
        load_before=load_before,
        load_after=load_average(),
        started=started,
        elapsed=time.perf_counter() - start,
        rows=results.rows(),
    )
