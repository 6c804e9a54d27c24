"""A pytest plugin for ``tests/compat/run.py``: skips the peers' internals tests, and
writes each test's outcome to a file for the harness to count.

Options (given by the harness):

- ``--compat-results=PATH``: a JSON line per test (and per module that failed to
  import): its id, ``passed``, ``failed``, ``error`` (outside the test's call),
  ``skipped``, the phase, and the error's first line;
- ``--compat-internals=PATH``: a JSON object from test id (without parameters) to the
  reason it checks the peer's internals; those tests are skipped with that reason,
- unless ``--compat-run-internals`` is given: then they run like the others.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import IO, Any

import pytest

_MESSAGE_LENGTH = 300


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trio_fork compat")
    group.addoption("--compat-results", help="where to write each test's outcome (JSON lines)")
    group.addoption("--compat-internals", help="a JSON file: test id -> why it is internals")
    group.addoption("--compat-run-internals", action="store_true", help="run those tests too")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("compat_results")
    if path:
        config.pluginmanager.register(_Recorder(open(path, "w")), "compat_recorder")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("compat_internals")
    if not path or config.getoption("compat_run_internals"):
        return
    with open(path) as file:
        internals: dict[str, str] = json.load(file)
    for item in items:
        reason = internals.get(base_id(item.nodeid))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"checks the peer's internals: {reason}"))


def base_id(nodeid: str) -> str:
    """A test's id without its parameters."""
    return nodeid.partition("[")[0]


class _Recorder:
    def __init__(self, file: IO[str]) -> None:
        self._file = file
        self._outcomes: dict[str, dict[str, Any]] = {}
        self._errors: dict[tuple[str, str], str] = {}

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write(
                {
                    "id": report.nodeid,
                    "outcome": "error",
                    "when": "collect",
                    "message": _message(report),
                    "text": report.longreprtext,
                }
            )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and call.excinfo is not None:
            # The exceptions themselves, out of the groups trio and anyio wrap them in.
            leaves = "; ".join(_describe(exc) for exc in _leaves(call.excinfo.value))
            self._errors[item.nodeid, call.when] = leaves
        return report

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = self._outcomes.setdefault(report.nodeid, {"id": report.nodeid})
        if "outcome" in record and record["outcome"] != "passed":
            return  # the first failure or skip is the one to tell
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
            message = self._errors.pop((report.nodeid, report.when), None)
            record.update(
                outcome=outcome,
                when=report.when,
                message=(message or _message(report))[:_MESSAGE_LENGTH],
                text=report.longreprtext,
            )
        elif report.skipped:
            record.update(outcome="skipped", when=report.when, message=_message(report))
        elif report.when == "call":
            record.update(outcome="passed", when="call")

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        record = self._outcomes.pop(nodeid, None)
        if record is not None and "outcome" in record:
            self._write(record)

    @pytest.hookimpl
    def pytest_unconfigure(self) -> None:
        self._file.close()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    lines = str(exc).strip().splitlines()
    return f"{name}: {lines[0]}" if lines else name


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first[:_MESSAGE_LENGTH]
