from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.helpers import leftover_processes
from tests.targets import open_fds
from trio_fork import _open

# pytester: for running small example suites that use the trio_fork plugin; tests.sshd:
# real OpenSSH servers on loopback and in network namespaces.
pytest_plugins = ["pytester", "tests.sshd"]

# The harness of `make compat`, which runs the peers' suites in runs of their own.
collect_ignore = ["compat"]

# The suite checks that what it starts gets the signal state of a fresh program. Run
# under nohup, SIGHUP would be ignored in all of it (an ignored signal stays ignored
# across exec); a handler of our own keeps this process alive through a hangup, as
# nohup wants, and every program started from here gets the default (a handler does
# not survive exec).
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda signum, frame: None)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves no process of ours (not even a zombie) and no descriptor."""
    fds_before = open_fds()
    yield
    # open_template() keeps a process-wide default template: each test starts its own.
    _open._stop_default()
    leftover = leftover_processes()
    assert not leftover, f"processes left behind: {leftover}"
    leaked = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
    assert not leaked, f"file descriptors leaked: {leaked}"
