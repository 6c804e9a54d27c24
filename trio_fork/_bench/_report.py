"""What the bench measures and what it found: the rows, the targets, the results.

The rows and targets are declared here once; the runner fills in samples by row key,
and the table, the JSON and the plot all read the same :class:`Report`.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Mapping

import attrs


class Kind(enum.Enum):
    """What a row's samples are, which decides how they are summarised and shown."""

    SPAWNS = "processes/s"
    """New processes started, run and reaped per second (median of the rounds)."""
    CALLS = "calls/s"
    """Round trips per second to workers that are already running (median)."""
    LATENCY = "s"
    """Seconds until something is ready, or done and gone (median)."""
    MEMORY = "bytes"
    """Memory per process (mean: PSS adds up over processes, and USS does too)."""

    def show(self, value: float) -> str:
        """``value``, a figure of this kind, as the table shows it."""
        if self is Kind.LATENCY:
            return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
        if self is Kind.MEMORY:
            return f"{value / 2**20:.1f} MiB"
        return f"{value:,.0f}/s" if value >= 100 else f"{value:.1f}/s"


@attrs.frozen
class Row:
    key: str
    label: str
    kind: Kind
    ballast_mb: int | None = None
    """Ballast held by the bench process while the row runs, if that is the point."""


BALLASTS_MB = (0, 200, 2048)


def ballast_name(megabytes: int) -> str:
    return f"{megabytes // 1024} GB" if megabytes >= 1024 else f"{megabytes} MB"


def ballast_key(base: str, megabytes: int) -> str:
    """The key of row ``base`` measured with ``megabytes`` of ballast: "os_fork_2gb"."""
    suffix = ballast_name(megabytes).replace(" ", "").lower() if megabytes else "0"
    return f"{base}_{suffix}"


def _by_ballast(base: str, label: str) -> tuple[Row, ...]:
    return tuple(
        Row(
            ballast_key(base, megabytes),
            label + (f", parent + {ballast_name(megabytes)}" if megabytes else ""),
            Kind.SPAWNS,
            megabytes,
        )
        for megabytes in BALLASTS_MB
    )


EXEC_BALLASTS_MB = (0, 2048)
"""The parent sizes of the run_process rows."""
EXEC_RUNNERS = {
    "exec_trio_fork": "trio_fork Template.run_process",
    "exec_anyio": "anyio.run_process",
    "exec_trio": "trio.run_process",
    "exec_as_user_trio_fork": "trio_fork Template.run_process, user=",
    "exec_as_user_anyio": "anyio.run_process, user=",
}
"""The run_process rows, each at every size of :data:`EXEC_BALLASTS_MB`. With
``user=`` (this process's own user), subprocess forks instead of using vfork."""


def _exec_rows() -> tuple[Row, ...]:
    return tuple(
        Row(
            ballast_key(base, megabytes),
            label + (f", parent + {ballast_name(megabytes)}" if megabytes else ""),
            Kind.SPAWNS,
            megabytes,
        )
        for base, label in EXEC_RUNNERS.items()
        for megabytes in EXEC_BALLASTS_MB
    )


RPC_IN_FLIGHT = 256
"""Calls in flight at once on the pipelined RPC row."""
POOL_WORKERS = 8
"""Workers that the pool start-up rows start."""


@attrs.frozen
class Section:
    """Rows shown together in the table, under a title."""

    title: str
    rows: tuple[Row, ...]
    starts: bool = False
    """Process starts: shown with a ratio to the floor and the size of the parent."""


SECTIONS: tuple[Section, ...] = (
    Section(
        "New processes per second: start, send one byte back, exit, be reaped",
        (
            Row("floor", "floor: a minimal Python forking itself", Kind.SPAWNS),
            *_by_ballast("os_fork", "os.fork() of this process"),
            Row("mp_fork", "multiprocessing, fork", Kind.SPAWNS),
            Row("mp_forkserver", "multiprocessing, forkserver", Kind.SPAWNS),
            Row("mp_spawn", "multiprocessing, spawn", Kind.SPAWNS),
            Row(
                "trio_parallel_fresh",
                "trio_parallel.run_sync, a fresh worker per call",
                Kind.SPAWNS,
            ),
            *_by_ballast("trio_fork_seq", "trio_fork spawn, one at a time"),
            *_by_ballast("trio_fork_32", "trio_fork spawn, 32 at a time"),
        ),
        starts=True,
    ),
    Section(
        "Calls per second to workers that are already running",
        (
            Row("trio_parallel_cached", "trio_parallel.run_sync, cached workers", Kind.CALLS),
            Row("anyio_to_process", "anyio.to_process.run_sync (reuses its workers)", Kind.CALLS),
            Row("trio_fork_run_sync", "trio_fork.run_sync (its default pool)", Kind.CALLS),
            Row(
                "rpc_pipelined",
                f"trio_fork RPC to one async worker, {RPC_IN_FLIGHT} calls in flight",
                Kind.CALLS,
            ),
        ),
    ),
    Section(
        "run_process(['/bin/true']) per second: start, run, exit, be reaped",
        _exec_rows(),
    ),
    Section(
        "Workers with numpy imported",
        (
            Row(
                "numpy_first_spawn",
                "first spawn from a template that preloaded numpy",
                Kind.LATENCY,
            ),
            Row("numpy_fresh_start", "fresh interpreter that imports numpy", Kind.LATENCY),
            Row(
                "numpy_pool_ready",
                f"trio_fork pool of {POOL_WORKERS} from a numpy template, all ready",
                Kind.LATENCY,
            ),
            Row(
                "trio_parallel_numpy_pool",
                f"trio_parallel starting {POOL_WORKERS} workers that import numpy",
                Kind.LATENCY,
            ),
            Row("numpy_child_pss", "PSS of an idle child of the numpy template", Kind.MEMORY),
            Row("numpy_fresh_pss", "PSS of an idle fresh interpreter with numpy", Kind.MEMORY),
            Row("numpy_template_pss", "PSS of the numpy template itself", Kind.MEMORY),
            Row(
                "numpy_child_uss",
                "USS (private memory) of an idle child of the template",
                Kind.MEMORY,
            ),
            Row(
                "numpy_fresh_uss",
                "USS (private memory) of an idle fresh interpreter",
                Kind.MEMORY,
            ),
        ),
    ),
    Section(
        "A template of one's own, for a test or a program: set-up + teardown",
        (
            Row("fixture_fork_template", "fork_template fixture", Kind.LATENCY),
            Row("fixture_fresh_template", "fixture starting a fresh template", Kind.LATENCY),
            Row(
                "fixture_fork_template_suite",
                "fork_template fixture, a test suite's preload",
                Kind.LATENCY,
            ),
            Row(
                "fixture_fresh_template_suite",
                "fixture starting a fresh template, a test suite's preload",
                Kind.LATENCY,
            ),
            Row(
                "open_template_plain",
                "open_template(fresh=True): an interpreter started",
                Kind.LATENCY,
            ),
            Row(
                "open_template_early",
                "open_template() in a program that called start_early() first",
                Kind.LATENCY,
            ),
            Row(
                "open_template_default",
                "open_template(), second and later: a fork of the default template",
                Kind.LATENCY,
            ),
        ),
    ),
    Section(
        "Programs: `trio-fork run` (a warm server) against python, command start to exit",
        (
            Row("numpy_run", "trio-fork run --preload=numpy numpy_line.py", Kind.LATENCY),
            Row("numpy_python", "python numpy_line.py (imports numpy, prints)", Kind.LATENCY),
            Row("run_empty", "trio-fork run of an empty script", Kind.LATENCY),
            Row("python_pass", "python -c pass", Kind.LATENCY),
            Row("numpy_run_20", "20 of trio-fork run numpy_line.py at once", Kind.LATENCY),
            Row("numpy_python_20", "20 of python numpy_line.py at once", Kind.LATENCY),
        ),
    ),
)
_PEERS = {
    "anyio": "anyio.to_process (warm)",
    "trio_parallel": "trio_parallel (warm)",
    "ppe": "ProcessPoolExecutor (warm)",
}
SECTIONS += (
    Section(
        "Large data: a 256 MiB numpy array to or from a warm worker, per call",
        (
            Row("large_arg_trio_fork", "argument: trio_fork.run_sync(numpy.max, a)", Kind.LATENCY),
            *(Row(f"large_arg_{k}", f"argument: {v}", Kind.LATENCY) for k, v in _PEERS.items()),
            Row("large_result_trio_fork", "result: trio_fork.run_sync(numpy.ones)", Kind.LATENCY),
            *(Row(f"large_result_{k}", f"result: {v}", Kind.LATENCY) for k, v in _PEERS.items()),
            Row(
                "large_roundtrip_trio_fork",
                "round trip: trio_fork.run_sync(numpy.negative, a)",
                Kind.LATENCY,
            ),
            Row(
                "large_roundtrip_joblib",
                "round trip: joblib loky, default memmapping (warm)",
                Kind.LATENCY,
            ),
            Row("large_memcpy", "one copy of the array here (a.copy())", Kind.LATENCY),
            Row(
                "large_memcpy_4k",
                "one copy into 4 KiB pages here (bytearray(a)), as shared memory is",
                Kind.LATENCY,
            ),
            Row(
                "large_memcpy_memfd",
                "one copy into a new memfd here (os.write), and its freeing",
                Kind.LATENCY,
            ),
            Row(
                "large_memcpy_reused",
                "one copy into memory that exists here (numpy.copyto), as into a reused memfd",
                Kind.LATENCY,
            ),
            Row(
                "large_shared_big", "shared_array argument, 256 MiB: run_sync(len, a)", Kind.LATENCY
            ),
            Row(
                "large_shared_small", "shared_array argument, 1 MiB: run_sync(len, a)", Kind.LATENCY
            ),
            Row(
                "large_rss_trio_fork",
                "peak RSS above before, caller + worker: trio_fork argument",
                Kind.MEMORY,
            ),
            Row(
                "large_rss_ppe",
                "peak RSS above before, caller + worker: ProcessPoolExecutor argument",
                Kind.MEMORY,
            ),
        ),
    ),
)
ROWS: tuple[Row, ...] = tuple(row for section in SECTIONS for row in section.rows)
ROW_BY_KEY = {row.key: row for row in ROWS}


@attrs.frozen
class Target:
    """A bound on a ratio of two rows measured in the same run, or on one row's figure."""

    key: str
    figure: str
    numerator: str
    denominator: str | None
    """None for a bound on the numerator's own figure, in its row's unit."""
    at_least: bool
    """True for "figure >= bound", False for "figure <= bound"."""
    bound: float

    @property
    def requirement(self) -> str:
        if self.denominator is None:
            bound = ROW_BY_KEY[self.numerator].kind.show(self.bound)
        else:
            bound = f"{self.bound:g}"
        return f"{'>=' if self.at_least else '<='} {bound}"


# The issues' target tables: ratios of two rows measured in the same run, and (where
# an issue sets one) a bound on a single figure.
TARGETS: tuple[Target, ...] = (
    Target(
        "spawn_vs_floor", "sequential spawn rate / floor", "trio_fork_seq_0", "floor", True, 0.7
    ),
    Target(
        "concurrent_vs_floor",
        "32-way concurrent spawn rate / floor",
        "trio_fork_32_0",
        "floor",
        True,
        1.0,
    ),
    Target(
        "spawn_vs_forkserver",
        "sequential spawn rate / multiprocessing forkserver",
        "trio_fork_seq_0",
        "mp_forkserver",
        True,
        10.0,
    ),
    Target(
        "big_parent_vs_small",
        "sequential spawn rate with a 2 GB parent / without",
        "trio_fork_seq_2gb",
        "trio_fork_seq_0",
        True,
        0.9,
    ),
    Target(
        "big_parent_vs_os_fork",
        "sequential spawn rate with a 2 GB parent / os.fork() of that parent",
        "trio_fork_seq_2gb",
        "os_fork_2gb",
        True,
        20.0,
    ),
    Target(
        "numpy_start_speedup",
        "numpy worker start: fresh interpreter time / first spawn time",
        "numpy_fresh_start",
        "numpy_first_spawn",
        True,
        50.0,
    ),
    Target(
        "numpy_pss_ratio",
        "PSS of an idle numpy-template child / fresh interpreter with numpy",
        "numpy_child_pss",
        "numpy_fresh_pss",
        False,
        0.15,
    ),
    Target(
        "fixture_time",
        "fork_template fixture set-up + teardown",
        "fixture_fork_template",
        None,
        False,
        0.020,
    ),
    Target(
        "fixture_speedup",
        "fresh-template fixture / fork_template fixture",
        "fixture_fresh_template",
        "fixture_fork_template",
        True,
        10.0,
    ),
    Target(
        "fixture_time_suite",
        "fork_template fixture set-up + teardown, suite preload",
        "fixture_fork_template_suite",
        None,
        False,
        0.020,
    ),
    Target(
        "fixture_speedup_suite",
        "fresh-template fixture / fork_template fixture, suite preload",
        "fixture_fresh_template_suite",
        "fixture_fork_template_suite",
        True,
        10.0,
    ),
    Target(
        "early_speedup",
        "open_template(fresh=True) / open_template() with Early",
        "open_template_plain",
        "open_template_early",
        True,
        10.0,
    ),
    Target(
        "default_template_time",
        "open_template() from the default template, second and later",
        "open_template_default",
        None,
        False,
        0.005,
    ),
    Target(
        "run_sync_vs_anyio",
        "sequential run_sync calls/s / anyio.to_process (warm)",
        "trio_fork_run_sync",
        "anyio_to_process",
        True,
        2.0,
    ),
    Target(
        "run_sync_vs_trio_parallel",
        "sequential run_sync calls/s / trio_parallel (warm)",
        "trio_fork_run_sync",
        "trio_parallel_cached",
        True,
        3.0,
    ),
    Target(
        "rpc_pipelined_rate",
        "pipelined RPC calls/s on one async-backend worker",
        "rpc_pipelined",
        None,
        True,
        20_000.0,
    ),
    Target(
        "pool_ready_time",
        f"pool of {POOL_WORKERS} from a numpy template: all ready",
        "numpy_pool_ready",
        None,
        False,
        0.050,
    ),
    *(
        Target(
            f"large_{direction}_vs_{peer}",
            f"256 MiB {direction}: {label} time / trio_fork run_sync time",
            f"large_{direction}_{peer}",
            f"large_{direction}_trio_fork",
            True,
            10.0,
        )
        for direction in ("arg", "result")
        for peer, label in _PEERS.items()
    ),
    Target(
        "large_roundtrip_vs_joblib",
        "256 MiB round trip: joblib loky time / trio_fork run_sync time",
        "large_roundtrip_joblib",
        "large_roundtrip_trio_fork",
        True,
        2.0,
    ),
    Target(
        "large_arg_vs_memcpy",
        "256 MiB argument: trio_fork run_sync time / one copy (a.copy())",
        "large_arg_trio_fork",
        "large_memcpy",
        False,
        1.5,
    ),
    Target(
        "large_shared_size",
        "shared_array argument: time for 256 MiB / for 1 MiB",
        "large_shared_big",
        "large_shared_small",
        False,
        2.0,
    ),
    Target(
        "large_rss",
        "peak RSS above before, caller + worker, 256 MiB argument",
        "large_rss_trio_fork",
        None,
        False,
        1.1 * 256 * 2**20,
    ),
    Target(
        "numpy_run_speedup",
        "python numpy_line.py / trio-fork run numpy_line.py",
        "numpy_python",
        "numpy_run",
        True,
        8.0,
    ),
    Target(
        "run_client_cost",
        "trio-fork run of an empty script / python -c pass",
        "run_empty",
        "python_pass",
        False,
        1.5,
    ),
    Target(
        "numpy_run_20_speedup",
        "20 python numpy_line.py at once / 20 trio-fork run at once",
        "numpy_python_20",
        "numpy_run_20",
        True,
        8.0,
    ),
    Target(
        "pool_vs_trio_parallel",
        f"trio_parallel starting {POOL_WORKERS} / pool of {POOL_WORKERS} from a template",
        "trio_parallel_numpy_pool",
        "numpy_pool_ready",
        True,
        20.0,
    ),
)


@attrs.frozen
class Settings:
    """How long and how often each row is measured."""

    mode: str
    backend: str
    rounds: int
    """Samples per row (but the memory rows), taken round-robin across all rows."""
    sample_seconds: float
    """Each rate sample runs for at least this long ..."""
    min_iterations: int
    """... and at least this many iterations."""
    concurrency: int
    idle_processes: int
    """Idle processes of each kind whose PSS is measured."""
    rpc_in_flight: int = RPC_IN_FLIGHT
    pool_workers: int = POOL_WORKERS

    @classmethod
    def for_mode(cls, *, quick: bool, backend: str, rounds: int | None = None) -> Settings:
        # Many short rounds rather than a few long ones: the round-robin then spreads
        # changes in the machine's load more evenly over the rows.
        if quick:
            return cls("quick", backend, rounds or 1, 0.2, 3, 32, 8)
        return cls("full", backend, rounds or 10, 0.5, 5, 32, 8)


@attrs.frozen
class RowResult:
    row: Row
    samples: tuple[float, ...] = ()
    note: str | None = None
    """Why the row has no samples (a peer that is not installed, say)."""
    parent_rss: int | None = None
    """Resident size, in bytes, of the process that forked (for the fork rows)."""

    @property
    def value(self) -> float | None:
        if not self.samples:
            return None
        if self.row.kind is Kind.MEMORY:
            return statistics.fmean(self.samples)
        return statistics.median(self.samples)


@attrs.frozen
class TargetResult:
    target: Target
    value: float | None
    """The ratio of the two rows' figures, or the one row's figure."""
    per_round: tuple[float, ...] = ()
    """The same within each round, whose spread shows how much noise the run had."""
    note: str | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        if self.target.at_least:
            return self.value >= self.target.bound
        return self.value <= self.target.bound


@attrs.frozen
class Report:
    settings: Settings
    machine: Mapping[str, object]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    started: str
    """When the run started, ISO 8601 in UTC."""
    elapsed: float
    rows: tuple[RowResult, ...]

    def row(self, key: str) -> RowResult:
        for result in self.rows:
            if result.row.key == key:
                return result
        raise KeyError(key)

    def versus_floor(self, key: str) -> float | None:
        """A spawn rate row's value as a multiple of the floor's."""
        result = self.row(key)
        if result.row.kind is not Kind.SPAWNS:
            return None
        return _ratio(result.value, self.row("floor").value)

    def targets(self) -> tuple[TargetResult, ...]:
        results = []
        for target in TARGETS:
            keys = [target.numerator]
            if target.denominator is not None:
                keys.append(target.denominator)
            missing = [self.row(key) for key in keys if self.row(key).value is None]
            if missing:
                # Rows skipped for one reason (numpy missing, say) give it once.
                why = "; ".join(dict.fromkeys(row.note or "no samples" for row in missing))
                results.append(TargetResult(target, None, note=f"not measured ({why})"))
                continue
            numerator = self.row(target.numerator)
            if target.denominator is None:
                results.append(TargetResult(target, numerator.value, numerator.samples))
                continue
            denominator = self.row(target.denominator)
            value = _ratio(numerator.value, denominator.value)
            per_round: tuple[float, ...] = ()
            # Rows sampled in the rounds pair up round by round; the memory rows'
            # samples are processes, which do not.
            if numerator.row.kind is not Kind.MEMORY:
                per_round = tuple(
                    top / bottom
                    for top, bottom in zip(numerator.samples, denominator.samples, strict=True)
                )
            results.append(TargetResult(target, value, per_round))
        return tuple(results)

    def to_json(self) -> dict[str, object]:
        """Every figure and every ratio, as plain JSON values."""
        return {
            "settings": attrs.asdict(self.settings),
            "machine": dict(self.machine),
            "load_average_before": list(self.load_before),
            "load_average_after": list(self.load_after),
            "started": self.started,
            "elapsed_seconds": self.elapsed,
            "rows": [
                {
                    "key": result.row.key,
                    "label": result.row.label,
                    "unit": result.row.kind.value,
                    "value": result.value,
                    "samples": list(result.samples),
                    "versus_floor": self.versus_floor(result.row.key),
                    "parent_ballast_mb": result.row.ballast_mb,
                    "parent_rss_bytes": result.parent_rss,
                    "note": result.note,
                }
                for result in self.rows
            ],
            "targets": [
                {
                    "key": result.target.key,
                    "figure": result.target.figure,
                    "numerator": result.target.numerator,
                    "denominator": result.target.denominator,
                    "unit": (
                        "ratio"
                        if result.target.denominator is not None
                        else ROW_BY_KEY[result.target.numerator].kind.value
                    ),
                    "value": result.value,
                    "per_round": list(result.per_round),
                    "target": result.target.requirement,
                    "met": result.met,
                    "note": result.note,
                }
                for result in self.targets()
            ],
        }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
