#!/usr/bin/env python3
"""``trio-fork``: the command line of trio_fork, the same as ``python -m trio_fork``.

Installed as a script of its own (hatch's shared-scripts), not one that installers
generate from an entry point: theirs imports re before anything else, and every
``trio-fork run`` would pay for that, a third of what the start of Python costs. For
the same reason ``run`` goes straight to its client (``trio_fork._zygote_client``).
Installers point the first line at the interpreter trio_fork is installed for.
"""

import sys


def _main() -> None:
    if sys.argv[1:2] == ["run"]:
        from trio_fork._zygote_client import main as run

        run(sys.argv[2:])
    from trio_fork._cli import main

    sys.exit(main())


if __name__ == "__main__":
    _main()
