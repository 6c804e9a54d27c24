"""The command line: ``python -m trio_fork``, or the ``trio-fork`` script.

``run`` goes straight to its small client, before argparse (a few milliseconds of
imports that every run would pay): see :mod:`trio_fork._zygote_client`.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    import argparse

    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        from ._zygote_client import main as run

        run(args[1:])  # exits
    return _main(args)


def _main(argv: list[str]) -> int:
    import argparse

    from ._zygote_client import program_name

    parser = argparse.ArgumentParser(
        prog=program_name(),
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
    commands.add_parser(
        "run",
        help="run a Python program in a process forked from a preloaded server",
        add_help=False,  # run parses its own arguments: see `run --help`
    )
    _add_serve(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
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


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import argparse

    serve = commands.add_parser(
        "serve",
        help="the server that `run` hands programs to, in the foreground",
        description="Serve `run` for this interpreter and preload list: keep a template "
        "that has imported the preload modules, and fork each run's program from it. "
        "It listens on a Unix socket in a directory only you can enter "
        "($XDG_RUNTIME_DIR/trio_fork, else $TMPDIR/trio_fork-UID). `run` starts one in the "
        "background when none runs.",
    )
    serve.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULES",
        help="modules for the template to import (comma-separated, or the option repeated)",
    )
    action = serve.add_mutually_exclusive_group()
    action.add_argument(
        "--status", action="store_true", help="say whether the server runs, and what it does"
    )
    action.add_argument("--stop", action="store_true", help="stop the server, and wait for it")
    serve.add_argument(
        "--all",
        action="store_true",
        help="with --status or --stop: every server of yours, whatever its preload",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="stop after this long without a run (default: never)",
    )
    serve.add_argument(
        "--backend", choices=["trio", "asyncio"], default="trio", help="the event loop to use"
    )
    # How a server started by `run` says that it listens (or why it cannot).
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._zygote_client import UsageError, ZygoteError, preload_list

    try:
        preload = preload_list(args.preload)
    except UsageError as exc:
        parser.error(str(exc))
    if args.all and not (args.status or args.stop):
        parser.error("--all goes with --status or --stop")
    try:
        if args.status or args.stop:
            return _control(preload, "stop" if args.stop else "status", every=args.all)
        from ._zygote_serve import main as serve

        return serve(
            preload, backend=args.backend, idle_timeout=args.idle_timeout, ready_fd=args.ready_fd
        )
    except ZygoteError as exc:
        sys.stderr.write(f"{parser.prog} serve: {exc}\n")
        return 1


def _control(preload: list[str], command: str, *, every: bool) -> int:
    import glob
    import os

    from ._zygote_client import runtime_directory, socket_path
    from ._zygote_control import control

    if every:
        paths = sorted(glob.glob(os.path.join(runtime_directory(), "*.sock")))
    else:
        paths = [socket_path(preload)]
    found = False
    for path in paths:
        text = control(path, command)
        if text is not None:
            found = True
            sys.stdout.write(text)
    if not found:
        which = "" if every else f" for {sys.executable} with preload {preload}"
        sys.stdout.write(f"no server runs{which}\n")
    return 0 if found or command == "stop" else 1
