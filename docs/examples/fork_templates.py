"""Specialised templates: fork a prepared template, then prepare the copy further."""

import trio

import trio_fork

CODE = """
import os

SETTINGS = {"greeting": "hello"}

def show(sock, *args):
    print(f"  child of {os.getppid()}: {SETTINGS['greeting']}, {args}")
"""


async def main() -> None:
    async with trio_fork.open_template() as base:
        await base.eval(CODE)
        await base.send_args("from base")
        async with base.fork() as formal:
            # Changes to the copy stay in the copy.
            await formal.eval("SETTINGS['greeting'] = 'good day'")
            await formal.send_args("from formal")
            print(f"base is {base.pid}, formal is {formal.pid}")
            for template in [base, formal]:
                async with template.spawn("__main__:show", "from spawn"):
                    pass


trio.run(main)
