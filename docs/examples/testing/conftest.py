import socket

import pytest

import echo_server


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request):
    return request.param


@pytest.fixture
async def server_address(fork_template):
    """A fresh server worker for each test, listening on a port of its own."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        async with fork_template.spawn(echo_server.serve, fds=[listener]):
            yield listener.getsockname()
