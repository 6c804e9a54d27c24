"""A template handed to a child process, which adopts it and spawns from it."""

import trio

import trio_fork

import jobs


async def main():
    async with (
        trio_fork.open_template(preload=["jobs"]) as shared,
        trio_fork.open_template(preload=["jobs"]) as workers,
    ):
        print(f"the shared template is process {shared.pid}")
        channel = await shared.export()
        async with workers.spawn(jobs.adopter) as adopter:
            # A descriptor, not the socket object: anyio's send_fds skips those.
            await adopter.stream.send_fds(b"template", [channel.fileno()])
            channel.close()
            print((await adopter.stream.receive()).decode())
        # The adopter's block has ended, and the shared template with it.


trio.run(main)
