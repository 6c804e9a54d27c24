"""Early: after start_early(), open_template() costs a fork, not a start-up."""

import time

import trio_fork

# First thing: before the program's own imports, before any event loop.
trio_fork.start_early()

import trio  # noqa: E402  (the program's imports come after start_early)


async def open_template_takes(fresh=False):
    """How long opening a template (and a first command) takes, as a median of 5."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        async with trio_fork.open_template(fresh=fresh) as template:
            await template.eval("pass")
        times.append(time.perf_counter() - started)
    return sorted(times)[2] * 1e3


async def main():
    with_early = await open_template_takes()
    trio_fork.stop_early()
    without = await open_template_takes(fresh=True)
    print(f"open_template() with the early template: {with_early:6.1f} ms")
    print(f"open_template() starting an interpreter: {without:6.1f} ms")


trio.run(main)
