from __future__ import annotations

import sys

# Absolute, and guarded: worker pools such as anyio.to_process re-run the parent's main
# file by path (as "__mp_main__"), where a relative import fails and the command line
# must not run again.
from trio_fork._cli import main

if __name__ == "__main__":
    sys.exit(main())
