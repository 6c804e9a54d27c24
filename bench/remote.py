"""The remote rows of the bench against a test sshd on 127.0.0.1 (tests/sshd.py).

    .venv/bin/python bench/remote.py [--quick] [--backend asyncio]

Starts a real sshd on loopback with keys made for the run, and runs
``python -m trio_fork bench --remote "ssh -F CONFIG testhost"`` against it, the remote
Python being this one. Needs sshd and ssh (apt-get install openssh-server openssh-client).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sshd import running_sshd  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tfork-bench-sshd-") as directory:
        with running_sshd(Path(directory)) as server:
            command = " ".join([*server.target.ssh, server.target.destination])
            return subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "trio_fork",
                    "bench",
                    "--remote",
                    command,
                    "--remote-python",
                    sys.executable,
                    *sys.argv[1:],
                ],
                cwd=ROOT,
            )


if __name__ == "__main__":
    sys.exit(main())
