from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import descendants


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used
    return fds


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves no process of ours (not even a zombie) and no descriptor."""
    fds_before = _open_fds()
    yield
    leftover = descendants()
    assert not leftover, f"processes left behind: {leftover}"
    leaked = {fd: target for fd, target in _open_fds().items() if fds_before.get(fd) != target}
    assert not leaked, f"file descriptors leaked: {leaked}"
