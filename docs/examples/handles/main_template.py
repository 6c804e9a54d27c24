"""A program forks itself into a template, then uses it from two event loops."""

import os

import anyio
import trio

import trio_fork

GREETING = "hello"  # a global of the program: every worker has it


def greet(sock, name):  # a function of the program's __main__: a worker can run it
    sock.sendall(f"{GREETING} {name}, from process {os.getpid()}".encode())


# Everything imported and defined so far is in the template. No event loop or
# thread runs yet, so forking this process is safe.
HANDLE = trio_fork.fork_main_template()


async def main(name):
    async with HANDLE.open() as template, template.spawn(greet, name) as child:
        print((await child.stream.receive()).decode())


trio.run(main, "trio")
anyio.run(main, "asyncio", backend="asyncio")
HANDLE.close()  # or let the interpreter's exit close it
