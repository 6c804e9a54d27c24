"""The command line: ``python -m trio_fork``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        return run(args.backend)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks
