"""An async target: the child runs its own event loop, on the parent's backend."""

import trio

import trio_fork

import workers


async def main() -> None:
    # The child imports trio (or asyncio) and anyio to run an async target:
    # preloading them makes every child start faster, and importing is safe.
    async with trio_fork.open_template(preload=["workers", "anyio", "trio"]) as template:
        async with template.spawn(workers.shout) as child:
            for word in ["hello", "structured", "concurrency"]:
                # Request and reply in lock step: each reply is one short send,
                # which arrives in one piece. Longer messages need framing.
                await child.stream.send(word.encode())
                print((await child.stream.receive()).decode())
            await child.stream.send_eof()  # ends the child's "async for"
            print(f"exit status {await child.wait()}")


trio.run(main)
