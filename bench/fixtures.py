"""Benchmarks of the fork_template fixture and of Early.

Run from the repository with ``.venv/bin/python bench/fixtures.py [--runs N]
[--backend trio|asyncio]``. The measurements are functions of
``trio_fork._bench_fixtures``, so that ``python -m trio_fork bench`` can include them.
"""

from __future__ import annotations

from trio_fork._bench_fixtures import main

if __name__ == "__main__":
    raise SystemExit(main())
