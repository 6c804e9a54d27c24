"""``python -m trio_fork._bench_rpc``: the figures of RPC, pools and run_sync, as a table.

This is a package's ``__main__`` so that workers started by spawning (trio_parallel's,
anyio's) do not run it again as their main module: that would import trio_fork into
each of them and make them look slower than they are.
"""

from __future__ import annotations

import argparse
import sys

import anyio

# Absolute: anyio.to_process runs this file by path in its workers, outside the package.
from trio_fork._bench_rpc import measure_all, render


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_fork._bench_rpc", description=__doc__)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument("--rounds", type=int, default=7, help="samples per row (default 7)")
    parser.add_argument(
        "--seconds", type=float, default=0.5, help="length of a rate sample (default 0.5)"
    )
    args = parser.parse_args()
    results = anyio.run(measure_all, args.rounds, args.seconds, backend=args.backend)
    sys.stdout.write(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
