"""The programs of the "Templates beyond one event loop" page print what it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples" / "handles"
PAGE = ROOT / "docs" / "beyond.md"

PID = r"\d+"
MS = r" *\d+\.\d ms"

EXPECTED: dict[str, list[str]] = {
    "main_template.py": [
        rf"hello trio, from process {PID}",
        rf"hello asyncio, from process {PID}",
    ],
    "early.py": [
        rf"open_template\(\) with the early template: {MS}",
        rf"open_template\(\) starting an interpreter: {MS}",
    ],
    "handover.py": [
        rf"the shared template is process (?P<shared>{PID})",
        rf"spawned by the adopter: process {PID}, child of (?P=shared)",
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_prints_what_the_page_shows(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch("\n".join(EXPECTED[name]) + "\n", result.stdout), result.stdout
    assert result.stderr == ""


def test_every_example_is_on_the_page() -> None:
    included = set(re.findall(r"```\{literalinclude\} examples/handles/(\S+)", PAGE.read_text()))
    assert included == {path.name for path in EXAMPLES.glob("*.py")}
    assert set(EXPECTED) == {path.name for path in EXAMPLES.glob("*.py")} - {"jobs.py"}
