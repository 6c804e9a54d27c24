"""``python -m trio_fork bench``: it runs and prints every row and every target.

Benchmarks are not timed tests: nothing here checks a figure, only that each row
was measured (or says why not) and that the output is well formed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from trio_fork._bench._report import ROWS, TARGETS
from trio_fork._cli import main

# The module's two quick runs come first, and take most of a minute.
pytestmark = pytest.mark.timeout(330)

LARGE_PEERS = ("trio_fork", "anyio", "trio_parallel", "ppe")
# The rows the issue asks for; the bench's own catalogue must match it exactly.
EXPECTED_ROWS = {
    "floor",
    "os_fork_0",
    "os_fork_200mb",
    "os_fork_2gb",
    "mp_fork",
    "mp_forkserver",
    "mp_spawn",
    "trio_parallel_fresh",
    "trio_parallel_cached",
    "anyio_to_process",
    "trio_fork_seq_0",
    "trio_fork_32_0",
    "trio_fork_seq_200mb",
    "trio_fork_32_200mb",
    "trio_fork_seq_2gb",
    "trio_fork_32_2gb",
    "trio_fork_run_sync",
    "rpc_pipelined",
    "numpy_first_spawn",
    "numpy_fresh_start",
    "numpy_pool_ready",
    "trio_parallel_numpy_pool",
    "numpy_child_pss",
    "numpy_fresh_pss",
    "numpy_template_pss",
    "numpy_child_uss",
    "numpy_fresh_uss",
    "fixture_fork_template",
    "fixture_fresh_template",
    "fixture_fork_template_suite",
    "fixture_fresh_template_suite",
    "open_template_plain",
    "open_template_early",
    "open_template_default",
    *(
        f"exec_{runner}_{size}"
        for runner in ("trio_fork", "anyio", "trio", "as_user_trio_fork", "as_user_anyio")
        for size in ("0", "2gb")
    ),
    "numpy_run",
    "numpy_python",
    "run_empty",
    "python_pass",
    "numpy_run_20",
    "numpy_python_20",
    *(f"large_{kind}_{peer}" for kind in ("arg", "result") for peer in LARGE_PEERS),
    "large_roundtrip_trio_fork",
    "large_roundtrip_joblib",
    "large_memcpy",
    "large_memcpy_4k",
    "large_memcpy_memfd",
    "large_memcpy_reused",
    "large_shared_big",
    "large_shared_small",
    "large_rss_trio_fork",
    "large_rss_ppe",
}
EXPECTED_TARGETS = {
    "spawn_vs_floor",
    "concurrent_vs_floor",
    "spawn_vs_forkserver",
    "big_parent_vs_small",
    "big_parent_vs_os_fork",
    "numpy_start_speedup",
    "numpy_pss_ratio",
    "fixture_time",
    "fixture_speedup",
    "fixture_time_suite",
    "fixture_speedup_suite",
    "early_speedup",
    "default_template_time",
    "run_sync_vs_anyio",
    "run_sync_vs_trio_parallel",
    "rpc_pipelined_rate",
    "pool_ready_time",
    "pool_vs_trio_parallel",
    "numpy_run_speedup",
    "run_client_cost",
    "numpy_run_20_speedup",
    *(f"large_{kind}_vs_{peer}" for kind in ("arg", "result") for peer in LARGE_PEERS[1:]),
    "large_roundtrip_vs_joblib",
    "large_arg_vs_memcpy",
    "large_shared_size",
    "large_rss",
}
HIDDEN = ("numpy", "trio_parallel")
# Rows that need an optional peer (the bench extra) that may not be installed here.
# (prefixes, suffixes): the large-data rows all need numpy, some a peer too.
PEER_ROWS = {
    "numpy": (("numpy_", "large_"), ()),
    "trio_parallel": (("trio_parallel_",), ("_trio_parallel",)),
    "joblib": ((), ("_joblib",)),
}
# Rows that run only on Trio: skipped in the run on asyncio.
TRIO_ONLY = ("exec_trio_0", "exec_trio_2gb")
UNITS = {row.key: row.kind.value for row in ROWS}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _needs(row: str, peers: tuple[str, ...]) -> bool:
    prefixes = tuple(prefix for name in peers for prefix in PEER_ROWS[name][0])
    suffixes = tuple(suffix for name in peers for suffix in PEER_ROWS[name][1])
    return row.startswith(prefixes) or row.endswith(suffixes)


@attrs.frozen
class Run:
    returncode: int
    stdout: str
    stderr: str


@attrs.frozen
class Runs:
    table: Run
    """On asyncio, with numpy and trio_parallel hidden: the table, and JSON in a file."""
    json: Run
    """On trio, with whatever is installed: JSON on stdout, and a plot."""
    json_file: Path
    plot: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two quick runs at once."""
    directory = tmp_path_factory.mktemp("bench")
    hidden = directory / "hidden"
    for name in HIDDEN:
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(
            f"raise ImportError('{name} hidden by the test')"
        )
    plot = directory / "plot.png"
    json_file = directory / "bench.json"
    command = [sys.executable, "-m", "trio_fork", "bench", "--quick"]
    path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    started = [
        subprocess.Popen(
            [*command, "--json", str(json_file), "--backend", "asyncio"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        ),
        subprocess.Popen(
            [*command, "--json", *(["--plot", str(plot)] if _installed("matplotlib") else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    finished = []
    try:
        for process in started:
            # Each run is about 30 s on an idle machine, most of it the large-data rows.
            stdout, stderr = process.communicate(timeout=300)
            finished.append(Run(process.returncode, stdout, stderr))
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                process.communicate()
    return Runs(finished[0], finished[1], json_file, plot)


def test_the_catalogue_has_the_issues_rows_and_targets() -> None:
    assert {row.key for row in ROWS} == EXPECTED_ROWS
    assert {target.key for target in TARGETS} == EXPECTED_TARGETS


def _line(lines: list[str], label: str) -> str:
    [line] = [line for line in lines if line.strip().startswith(label + "  ")]
    return line


def test_table_prints_every_row_and_target(runs: Runs) -> None:
    run = runs.table
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for row in ROWS:
        line = _line(lines, row.label)
        figure = line.strip()[len(row.label) :].split()
        if _needs(row.key, HIDDEN) or row.key.startswith(TRIO_ONLY):
            assert figure[0] == "-", line
            assert "skipped:" in line, line
            # numpy's rows say it is hidden; trio_parallel's, first, that this is asyncio.
            assert "hidden by the test" in line or "runs only on Trio" in line, line
        else:
            assert figure[0] != "-", line
    for target in TARGETS:
        line = _line(lines, target.figure)
        if _needs(target.numerator, HIDDEN) or _needs(target.denominator or "", HIDDEN):
            assert "not measured (skipped:" in line, line
        else:
            assert line.rstrip().endswith((" met", " MISSED")), line
    assert "Load average" in run.stdout


def test_json_file_written_alongside_the_table(runs: Runs) -> None:
    report = json.loads(runs.json_file.read_text())
    assert report["settings"]["backend"] == "asyncio"
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == EXPECTED_ROWS
    assert "numpy hidden by the test" in rows["numpy_first_spawn"]["note"]
    assert "numpy hidden by the test" in rows["numpy_pool_ready"]["note"]
    # Hidden, and on asyncio: trio_parallel says the first reason that applies.
    assert "runs only on Trio" in rows["trio_parallel_fresh"]["note"]
    assert "runs only on Trio" in rows["trio_parallel_numpy_pool"]["note"]
    for key, row in rows.items():
        if _needs(key, HIDDEN) or key.startswith(TRIO_ONLY):
            assert row["value"] is None
            assert row["samples"] == []
            assert row["note"].startswith("skipped:"), row
        else:
            assert row["note"] is None, row
            assert row["value"] > 0
    for target in report["targets"]:
        if _needs(target["numerator"], HIDDEN) or _needs(target["denominator"] or "", HIDDEN):
            assert target["value"] is None
            assert target["met"] is None
            assert target["per_round"] == []
            assert "not measured" in target["note"]


def test_progress_goes_to_stderr(runs: Runs) -> None:
    run = runs.table
    assert "bench [" in run.stderr
    assert "bench finished" in run.stderr
    assert "bench [" not in run.stdout


def test_plot_is_a_png(runs: Runs) -> None:
    pytest.importorskip("matplotlib")
    assert runs.plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def _json(runs: Runs) -> dict[str, Any]:
    run = runs.json
    assert run.returncode == 0, run.stderr
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def test_json_has_every_row_with_a_figure_or_a_skip_note(runs: Runs) -> None:
    report = _json(runs)
    assert report["settings"]["backend"] == "trio"
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == EXPECTED_ROWS
    missing = tuple(name for name in PEER_ROWS if not _installed(name))
    for key, row in rows.items():
        assert row["unit"] == UNITS[key]
        if _needs(key, missing):
            assert row["note"].startswith("skipped:"), row
            assert "is not installed" in row["note"], row
        else:
            assert row["note"] is None, row
            assert row["value"] > 0
            assert len(row["samples"]) >= 1


def test_json_has_every_target(runs: Runs) -> None:
    report = _json(runs)
    targets = {target["key"]: target for target in report["targets"]}
    assert set(targets) == EXPECTED_TARGETS
    missing = tuple(name for name in PEER_ROWS if not _installed(name))
    for target in targets.values():
        numerator, denominator = target["numerator"], target["denominator"]
        assert target["unit"] == ("ratio" if denominator else UNITS[numerator])
        if _needs(numerator, missing) or _needs(denominator or "", missing):
            assert target["value"] is None
            assert "not measured" in target["note"]
        else:
            assert target["value"] > 0
            assert target["met"] in (True, False)
            # One round in quick mode, so the figure in that round is the figure;
            # memory samples of processes are not rounds, and have none.
            per_round = [pytest.approx(target["value"])]
            if UNITS[numerator] == "bytes" and denominator:
                per_round = []
            assert target["per_round"] == per_round
    assert report["settings"]["mode"] == "quick"
    assert report["machine"]["cpus"] >= 1
    assert len(report["load_average_before"]) == 3


def test_plot_without_matplotlib_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--quick", "--plot", str(tmp_path / "plot.png")])
    assert raised.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_into_a_missing_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--quick", "--plot", str(tmp_path / "missing" / "plot.png")])
    assert raised.value.code == 2
    assert "does not exist" in capsys.readouterr().err
