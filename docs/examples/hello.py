"""The smallest trio_fork program: one template, one child."""

import trio

import trio_fork

import workers  # docs/examples/workers.py, importable in the template too


async def main() -> None:
    async with trio_fork.open_template(preload=["workers"]) as template:
        print(f"template {template.pid} is ready")
        async with template.spawn(workers.greet, "world") as child:
            # The child sends one message and exits: read until end of stream.
            message = b"".join([chunk async for chunk in child.stream])
            print(f"child {child.pid} sent: {message.decode()}")
        print(f"child {child.pid} exited with status {child.returncode}")


trio.run(main)
