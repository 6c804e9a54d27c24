"""Preparing a template: modules, code, and arguments queued for every child."""

import os

import trio

import trio_fork

# Defined in the template's __main__, so children find it as "__main__:report".
CODE = """
import os

def report(sock, *received):
    for position, arg in enumerate(received):
        if isinstance(arg, int):
            os.write(arg, f"{GREETING} through the descriptor at position {position}".encode())
            os.close(arg)
        print(f"  {position}: {arg!r}")
"""


async def main() -> None:
    queued_read, queued_write = os.pipe()
    spawn_read, spawn_write = os.pipe()
    async with trio_fork.open_template() as template:
        await template.eval("GREETING = args[0].upper()", "hello")
        await template.eval(CODE)
        # Queued for every child forked from now on, in this order.
        await template.send_args("a")
        await template.send_fds(queued_write)
        await template.send_args(b"b", {"k": 1})
        print("the child is called report(sock, *queued, *args, *fds):")
        async with template.spawn("__main__:report", "c", fds=[spawn_write]):
            pass
    # The template and the child had copies of the write ends; ours are still open.
    for read_end, write_end in [(queued_read, queued_write), (spawn_read, spawn_write)]:
        print(f"read from a pipe: {os.read(read_end, 1024).decode()}")
        os.close(read_end)
        os.close(write_end)


trio.run(main)
