import anyio
import pytest

pytestmark = pytest.mark.anyio


async def test_the_server_upper_cases(server_address):
    async with await anyio.connect_tcp(*server_address) as stream:
        await stream.send(b"hello")
        assert await stream.receive() == b"HELLO"


async def test_each_test_gets_its_own_server(server_address):
    async with await anyio.connect_tcp(*server_address) as stream:
        await stream.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
