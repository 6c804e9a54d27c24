"""Run programs from a template: anyio.run_process's interface, and this process never forks."""

import trio

import trio_fork


async def main():
    async with trio_fork.open_template() as template:
        result = await template.run_process(["echo", "hello from echo"])
        print(f"{result.args}: {result.stdout!r}, status {result.returncode}")

        # Every signal at its default, as subprocess gives them: no "Broken pipe" here.
        result = await template.run_process("yes | head -n 2")
        print(f"yes | head -n 2: {result.stdout!r}, stderr {result.stderr!r}")

        try:
            await template.run_process(["no-such-program"])
        except FileNotFoundError as exc:
            print(f"FileNotFoundError: {exc.strerror}: {exc.filename!r}")

        async with await template.open_process(["tr", "a-z", "A-Z"]) as process:
            await process.stdin.send(b"through a pipe")
            await process.stdin.aclose()
            output = b"".join([chunk async for chunk in process.stdout])
            print(f"tr, a child of the template ({process.pid}): {output!r}")
        print(f"tr exited with status {process.returncode}")


trio.run(main)
