"""What goes wrong, and how trio_fork tells you."""

import os
import signal

import trio

import trio_fork


async def main() -> None:
    async with trio_fork.open_template() as template:
        # An exception in the template comes back as RemoteError.
        try:
            await template.eval("settings = load()")
        except trio_fork.RemoteError as exc:
            print(f"type_name: {exc.type_name!r}")
            print(f"message: {exc.message!r}")
            print(f"str():\n{exc}")

        # So does a target that cannot be found; no process is left behind.
        try:
            async with template.spawn("workers:no_such_function"):
                pass
        except trio_fork.RemoteError as exc:
            print(f"spawn: {exc.type_name}: {exc.message}")

        # Bad input is refused here, before anything is sent.
        try:
            async with template.spawn(lambda sock: None):
                pass
        except TypeError as exc:
            print(f"spawn(lambda): TypeError: {exc}")

        # The template itself dies: every later command says so.
        os.kill(template.pid, signal.SIGKILL)
        try:
            await template.require("json")
        except trio_fork.BrokenTemplateError as exc:
            print(f"BrokenTemplateError: {exc}")


trio.run(main)
