"""The functions the hand-over example runs in its processes."""

import os
import socket

import trio_fork


def whoami(sock, label):
    sock.sendall(f"{label}: process {os.getpid()}, child of {os.getppid()}".encode())


async def adopter(stream):
    """Adopt the template whose channel arrives on ``stream``, and spawn from it."""
    _, [fd] = await stream.receive_fds(1, 1)
    with socket.socket(fileno=fd) as channel:
        async with trio_fork.adopt_template(channel) as template:
            async with template.spawn(whoami, "spawned by the adopter") as child:
                await stream.send(await child.stream.receive())
