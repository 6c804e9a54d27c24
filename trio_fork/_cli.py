"""The command line: ``python -m trio_fork``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trio_fork",
        description="Fast, structured worker processes forked from template processes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="a short tour of what trio_fork does")
    demo.add_argument(
        "--backend", choices=["trio", "asyncio"], default="trio", help="the event loop to use"
    )
    bench = commands.add_parser(
        "bench",
        help="spawn rates, calls, start-up times and memory, side by side with the peers",
        description="Measure trio_fork against a minimal fork loop, os.fork() of a growing "
        "parent, multiprocessing, trio_parallel and anyio.to_process: spawns, run_sync and "
        "RPC calls, pools and numpy workers, the fork_template fixture and Early; then check "
        "the project's performance targets. Progress goes to stderr, results to stdout.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a run of seconds instead of minutes, less precise"
    )
    bench.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="every figure and ratio as JSON: on stdout instead of the table, or into FILE",
    )
    bench.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw spawn rate against parent size (needs matplotlib)",
    )
    bench.add_argument(
        "--backend", choices=["trio", "asyncio"], default="trio", help="the event loop to use"
    )
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        help="samples per row (default: 1 with --quick, else 10)",
    )
    bench.add_argument(
        "--remote",
        metavar="COMMAND",
        help="instead, the remote rows: remote templates through this ssh command "
        '("ssh [options] host"), side by side with execnet, raw ssh and a local template',
    )
    bench.add_argument(
        "--remote-python",
        default="python3",
        metavar="PYTHON",
        help="the interpreter on the remote host, for trio_fork and execnet alike",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        return run(args.backend)
    if args.command == "bench" and args.remote is not None:
        from ._bench._remote import run as run_remote

        return run_remote(args.remote, args.remote_python, quick=args.quick, backend=args.backend)
    if args.command == "bench":
        from ._bench import output_problem, plot_problem
        from ._bench import run as run_bench

        for option, path in (("--plot", args.plot), ("--json", args.json)):
            if path not in (None, "-") and (problem := output_problem(option, path)) is not None:
                parser.error(problem)
        if args.plot is not None and (problem := plot_problem()) is not None:
            parser.error(problem)
        return run_bench(
            quick=args.quick,
            json=args.json,
            plot=args.plot,
            backend=args.backend,
            rounds=args.rounds,
        )
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks
