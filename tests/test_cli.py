"""The command line."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_demo_runs(backend: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_fork", "demo", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for step in range(1, 7):
        assert f"\n{step}. " in result.stdout
    assert "exit status -9" in result.stdout
    assert "ZeroDivisionError" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_fork", "frobnicate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
