"""A pre-forked server: workers forked from one template share its listening socket."""

import socket

import trio

import trio_fork

import workers


async def run_worker(template: trio_fork.Template, number: int) -> None:
    async with template.spawn(workers.accept_one, number):
        pass  # leaving the block waits until the worker has served its connection


async def main() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()
        async with trio_fork.open_template(preload=["workers"]) as template:
            await template.send_fds(listener)  # every worker gets it, as an int
            async with trio.open_nursery() as nursery:
                for number in range(3):
                    nursery.start_soon(run_worker, template, number)
                for _ in range(3):
                    async with await trio.open_tcp_stream(host, port) as client:
                        reply = b"".join([chunk async for chunk in client])
                        print(reply.decode(), end="")


trio.run(main)
