"""Exit statuses, and the Child handle: waiting, signalling, killing."""

import signal

import trio

import trio_fork

import workers


async def main() -> None:
    async with trio_fork.open_template(preload=["workers"]) as template:
        async with template.spawn(workers.nap, 0.01) as child:
            pass
        print(f"returned:             {child.returncode}")

        async with template.spawn(workers.exit_with, 3) as child:
            print(f"while running:        {child.returncode}")
        print(f"sys.exit(3):          {child.returncode}")

        async with template.spawn(workers.divide, 1, 0) as child:
            await child.wait()  # the traceback is on the child's stderr, which is ours
        print(f"raised:               {child.returncode}")

        async with template.spawn(workers.wait_for_signal) as child:
            await child.stream.receive()  # "ready"
            child.send_signal(signal.SIGUSR1)
            print(f"signal.SIGUSR1:       {await child.wait()}")

        async with template.spawn(workers.wait_for_signal) as child:
            await child.stream.receive()
            child.kill()
            status = await child.wait()
            print(f"kill():               {status} ({signal.Signals(-status).name})")


trio.run(main)
