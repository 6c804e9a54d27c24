"""trio_fork under asyncio: the same API, through AnyIO."""

import asyncio

import trio_fork

import workers


async def wait_forever(template: trio_fork.Template, children: list[trio_fork.Child]) -> None:
    async with template.spawn(workers.wait_for_signal) as child:
        children.append(child)
        await child.stream.receive()
        await asyncio.sleep(3600)


async def main() -> None:
    async with trio_fork.open_template(preload=["workers", "anyio"]) as template:
        # An async target runs under asyncio too, because we do.
        async with template.spawn(workers.shout) as child:
            await child.stream.send(b"hello")
            print((await child.stream.receive()).decode())
        print(f"exit status {child.returncode}")

        # asyncio's own cancellation ends a spawn block like any other.
        children: list[trio_fork.Child] = []
        try:
            await asyncio.wait_for(wait_forever(template, children), timeout=0.2)
        except TimeoutError:
            print(f"timed out: the child was killed, status {children[0].returncode}")


asyncio.run(main())
