"""The fixture and Early benchmarks run and report every row (their figures are not
checked here: timings belong to benchmarks, not to tests)."""

from __future__ import annotations

import pytest

from trio_fork import _bench_fixtures, _template


def test_the_benchmarks_run_and_print_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench_fixtures.main(["--runs", "2", "--backend", "asyncio"]) == 0
    assert _template._early is None  # measure_open_template(early=True) stopped it
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9
    for name in (
        "fork_template fixture: set-up + teardown (preload: a test suite's)",
        "fixture starting a fresh template per test (no preload)",
        "open_template() after start_early()",
        "  open_template() after Early is faster",
    ):
        assert any(line.startswith(name) for line in lines), name
    assert sum(line.rstrip().endswith("target >= 10x") for line in lines) == 3
