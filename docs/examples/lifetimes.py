"""Structured lifetimes: what leaving a spawn block early does to the child."""

import trio

import trio_fork

import workers


async def terminate_then_kill(child: trio_fork.Child) -> None:
    # Ask nicely; if the child is still there after a grace period, insist.
    # The spawn block stops this function as soon as the child has exited.
    child.terminate()
    await trio.sleep(5)
    child.kill()


async def main() -> None:
    async with trio_fork.open_template(preload=["workers"]) as template:
        with trio.move_on_after(0.2):
            async with template.spawn(workers.wait_for_signal) as child:
                await child.stream.receive()
                await trio.sleep_forever()
        print(f"cancelled: the child was killed, status {child.returncode}")

        with trio.move_on_after(0.2):
            async with template.spawn(
                workers.serve_until_terminated, deliver_cancel=terminate_then_kill
            ) as child:
                await child.stream.receive()
                await trio.sleep_forever()
        print(f"cancelled with deliver_cancel: status {child.returncode}")

        try:
            async with template.spawn(workers.wait_for_signal) as child:
                await child.stream.receive()
                raise RuntimeError("something went wrong here")
        except RuntimeError as exc:
            print(f"{exc}: the child was killed, status {child.returncode}")


trio.run(main)
