"""``make compat``: the peers' own test suites, run against trio_fork.

trio_fork.run_sync claims trio_parallel.run_sync's interface, and to stand in for
anyio.to_process.run_sync. This runs the tests with which those peers check their own
interface, with their public names mapped to trio_fork's:

- trio-parallel's ``_tests/test_defaults.py`` and ``_tests/test_impl.py``, which ship
  in its wheel, run in a ``trio_parallel`` package whose public names are trio_fork's
  (``tests/compat/trio_parallel_shim``), under trio-parallel's own pytest settings
  (``tests/compat/trio_parallel.ini``);
- anyio's ``tests/test_to_process.py``, from its sdist, with its own ``conftest.py``
  and pytest settings, with ``anyio.to_process.run_sync`` being trio_fork's
  (``tests/compat/anyio_shim.py``), on every backend anyio's tests run on here.

The releases are downloaded with pip into ``.compat-cache/`` (git-ignored) the first
time; nothing of theirs is kept in the repository. One suite runs at a time.

The tests that check a peer's internals rather than its interface are listed, with
the reason, in the table of docs/rpc.md; they are skipped with that reason. The
others must pass: the exit status is 1 if any fails.

Usage: ``python tests/compat/run.py [--report] [--suite trio_parallel|anyio] [-- ARGS]``,
where ARGS go to pytest.
``--report`` runs the internals tests too, lists every failure with its first line,
and exits 0 whatever failed: for measuring, not for gating.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compat_plugin import base_id

TRIO_PARALLEL_VERSION = "1.3.0"
ANYIO_VERSION = "4.16.0"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".compat-cache"
INTERNALS_DOC = ROOT / "docs" / "rpc.md"


@dataclass
class Suite:
    """One peer's tests, as one pytest run."""

    name: str
    rootdir: Path
    pytest_args: list[str]
    pythonpath: list[Path]
    id_prefix: str
    """How the ids of its tests begin."""
    group: Callable[[str], str]
    """The line of the summary a test id is counted on."""
    extra_args: list[str] = field(default_factory=list)
    """Arguments for pytest from the command line."""
    records: list[dict[str, str]] = field(default_factory=list)
    returncode: int = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument(
        "--report",
        action="store_true",
        help="run the internals tests too, list every failure, and exit 0",
    )
    parser.add_argument(
        "--suite",
        action="append",
        choices=["trio_parallel", "anyio"],
        help="run only this suite (may be repeated; default: both)",
    )
    parser.add_argument(
        "pytest_args",
        nargs="*",
        metavar="-- PYTEST_ARGS",
        help="more arguments for pytest, after --: -k test_aclose, -x, ...",
    )
    options = parser.parse_args(argv)
    internals = read_internals(INTERNALS_DOC)
    chosen = options.suite or ["trio_parallel", "anyio"]
    CACHE.mkdir(exist_ok=True)
    suites = [PREPARE[name]() for name in chosen]

    internals_file = CACHE / "internals.json"
    internals_file.write_text(json.dumps(internals, indent=1))
    for suite in suites:
        suite.extra_args = options.pytest_args
        run(suite, internals_file, run_internals=options.report)

    return summarize(suites, internals, report=options.report)


# The internals list: the table of docs/rpc.md whose first column is a test id.

_INTERNALS_ROW = re.compile(r"^\|\s*`(?P<id>[^`]+::[^`]+)`\s*\|(?P<reason>.*)\|\s*$")


def read_internals(doc: Path) -> dict[str, str]:
    internals: dict[str, str] = {}
    for line in doc.read_text().splitlines():
        match = _INTERNALS_ROW.match(line)
        if match:
            internals[match["id"]] = match["reason"].strip()
    if not internals:
        raise SystemExit(f"compat: no table of internals tests found in {doc}")
    return internals


# Fetching and laying out the peers' releases.


def download(requirement: str, *, sdist: bool) -> Path:
    """The file of ``requirement``'s release, downloaded with pip the first time."""
    folder = CACHE / "downloads" / requirement.replace("==", "-")
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    if not files:
        folder.mkdir(parents=True, exist_ok=True)
        kind = ["--no-binary=:all:"] if sdist else ["--only-binary=:all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind]
        command += ["--disable-pip-version-check", "--dest", str(folder), requirement]
        print(f"compat: downloading {requirement} with pip", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        files = sorted(folder.glob("*"))
        if done.returncode or len(files) != 1:
            shutil.rmtree(folder)
            raise SystemExit(f"compat: pip could not download {requirement}:\n{done.stderr}")
    return files[0]


def unpack(archive: Path, destination: Path) -> Path:
    if not destination.is_dir():
        partial = destination.with_name(destination.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                wheel.extractall(partial)
        else:
            with tarfile.open(archive) as sdist:
                if hasattr(tarfile, "data_filter"):
                    sdist.extractall(partial, filter="data")
                else:  # Python before 3.10.12: no filters, and none needed for a sdist
                    sdist.extractall(partial)
        partial.rename(destination)
    return destination


def prepare_trio_parallel() -> Suite:
    wheel = download(f"trio-parallel=={TRIO_PARALLEL_VERSION}", sdist=False)
    unpacked = unpack(wheel, CACHE / f"trio_parallel-{TRIO_PARALLEL_VERSION}")
    # Laid out anew each time, so that changes to the shim take effect: the shim as
    # the trio_parallel package, with the release's tests as its _tests, and the
    # release's worker-side helper package (functions the tests send to workers).
    run_dir = CACHE / f"trio_parallel-{TRIO_PARALLEL_VERSION}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    package = run_dir / "trio_parallel"
    shutil.copytree(
        HERE / "trio_parallel_shim",
        package,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(
        unpacked / "trio_parallel" / "_tests",
        package / "_tests",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(unpacked / "_trio_parallel_workers", run_dir / "_trio_parallel_workers")
    tests = package / "_tests"
    return Suite(
        name=f"trio_parallel {TRIO_PARALLEL_VERSION}",
        rootdir=run_dir,
        pytest_args=[
            "-c",
            str(HERE / "trio_parallel.ini"),
            str(tests / "test_defaults.py"),
            str(tests / "test_impl.py"),
        ],
        # First, so that subprocesses the tests start import the shim too, rather
        # than a trio_parallel that may be installed.
        pythonpath=[run_dir],
        id_prefix="trio_parallel/_tests/",
        group=lambda test_id: "",
    )


def prepare_anyio() -> Suite:
    sdist = download(f"anyio=={ANYIO_VERSION}", sdist=True)
    unpacked = unpack(sdist, CACHE / f"anyio-{ANYIO_VERSION}") / f"anyio-{ANYIO_VERSION}"
    installed = importlib.metadata.version("anyio")
    if installed != ANYIO_VERSION:
        print(
            f"compat: note: anyio {installed} is installed; the tests are {ANYIO_VERSION}'s",
            flush=True,
        )
    return Suite(
        name=f"anyio {ANYIO_VERSION}",
        rootdir=unpacked,
        pytest_args=[
            "-c",
            str(unpacked / "pyproject.toml"),
            "-p",
            "anyio_shim",
            str(unpacked / "tests" / "test_to_process.py"),
        ],
        pythonpath=[],
        id_prefix="tests/test_to_process.py",
        group=_backend,
    )


def _backend(test_id: str) -> str:
    """The backend of a test of anyio's, from its id: ``test_x[trio]`` is on trio."""
    return test_id.partition("[")[2].rstrip("]") or "no backend"


PREPARE: dict[str, Callable[[], Suite]] = {
    "trio_parallel": prepare_trio_parallel,
    "anyio": prepare_anyio,
}


# Running and counting.


def run(suite: Suite, internals_file: Path, *, run_internals: bool) -> None:
    results = CACHE / f"results-{suite.name.replace(' ', '-')}.jsonl"
    results.unlink(missing_ok=True)
    command = [
        # The pytest command, as the peers' own CI runs it (tox, nox), rather than
        # python -m pytest: what a program's __main__ is decides what its workers
        # load (anyio's test_entrypoint_main_module), and this __main__ is a script.
        str(Path(sys.executable).parent / "pytest"),
        "--rootdir",
        str(suite.rootdir),
        "-p",
        "compat_plugin",
        f"--compat-results={results}",
        f"--compat-internals={internals_file}",
        # Their tests, their cache: nothing written beside the downloaded files.
        "-p",
        "no:cacheprovider",
        *(["--compat-run-internals"] if run_internals else []),
        *suite.pytest_args,
        *suite.extra_args,
    ]
    paths = [*suite.pythonpath, HERE]
    inherited = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*map(str, paths), *([inherited] if inherited else [])]),
    }
    print(f"\ncompat: {suite.name}: {' '.join(command)}", flush=True)
    suite.returncode = subprocess.run(command, cwd=suite.rootdir, env=env, check=False).returncode
    if results.exists():
        with results.open() as file:
            suite.records = [json.loads(line) for line in file]


def summarize(suites: list[Suite], internals: dict[str, str], *, report: bool) -> int:
    totals: collections.Counter[str] = collections.Counter()
    failures: list[tuple[Suite, dict[str, str]]] = []
    broken = False
    seen: set[str] = set()
    print()
    for suite in suites:
        counts: dict[str, collections.Counter[str]] = {}
        for record in suite.records:
            seen.add(base_id(record["id"]))
            outcome = "failed" if record["outcome"] == "error" else record["outcome"]
            counts.setdefault(suite.group(record["id"]), collections.Counter())[outcome] += 1
            totals[outcome] += 1
            if outcome == "failed":
                failures.append((suite, record))
        for group, count in sorted(counts.items()):
            where = f"{suite.name} [{group}]" if group else suite.name
            print(f"compat: {where}: {_counts(count)}")
        # pytest's own exit status: 1 is "tests failed", counted above; anything
        # else but 0 is a run that went wrong (a crash, a usage error, no tests).
        if suite.returncode not in (0, 1) or not suite.records:
            print(f"compat: {suite.name}: pytest exited with status {suite.returncode}")
            broken = True

    # (Unless tests were deselected on purpose, with pytest arguments.)
    unmatched = [
        test_id
        for test_id in internals
        if test_id not in seen
        and any(test_id.startswith(s.id_prefix) and not s.extra_args for s in suites)
    ]
    for test_id in sorted(unmatched):
        print(f"compat: docs/rpc.md lists {test_id} as internals, but no such test ran")

    if failures:
        print("\ncompat: failures (the full tracebacks are above):")
        for suite, record in failures:
            listed = " [internals]" if base_id(record["id"]) in internals else ""
            where = "" if record["when"] == "call" else f" (in {record['when']})"
            print(f"  {suite.name}: {record['id']}{listed}{where}")
            print(f"      {record['message']}")
    print(_counts(totals))
    if report:
        return 0
    return 1 if broken or totals["failed"] else 0


def _counts(counts: collections.Counter[str]) -> str:
    line = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["skipped"]:
        line += f", {counts['skipped']} skipped"
    return line


if __name__ == "__main__":
    sys.exit(main())
