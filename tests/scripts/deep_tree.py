"""A parent whose templates' children have children of their own; it reports them, and waits.

Run as ``python -m tests.scripts.deep_tree BACKEND`` from the repository root. Prints
one JSON line: this process's pid, the templates' pids (one forked from another, one
busy in a long command), the children's and the grandchildren's (each child forked
one, which sleeps).
"""

from __future__ import annotations

import json
import os
import sys

import anyio

import trio_fork
from tests.helpers import receive

# Run in the templates: a target that forks a grandchild, reports its pid, and sleeps.
PARENT_OF = """
import os, time
from tests.targets import send

def parent_of(sock):
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(3600)
    send(sock, [os.getpid(), pid])
    while True:
        time.sleep(3600)
"""


async def hold(template: trio_fork.Template, pids: list[list[int]], ready: anyio.Event) -> None:
    async with template.spawn("__main__:parent_of") as child:
        pids.append(await receive(child.stream))
        ready.set()
        await anyio.sleep_forever()


async def main() -> None:
    families: list[list[int]] = []
    async with (
        trio_fork.open_template(preload=["tests.targets"]) as template,
        trio_fork.open_template(preload=["tests.targets"]) as busy,
        template.fork() as forked,
        anyio.create_task_group() as task_group,
    ):
        for owner in (template, forked, busy):
            await owner.eval(PARENT_OF)
            ready = anyio.Event()
            task_group.start_soon(hold, owner, families, ready)
            await ready.wait()
        task_group.start_soon(busy.eval, "import time; time.sleep(600)")
        await anyio.sleep(0.1)
        report = {
            "parent": os.getpid(),
            "templates": [template.pid, forked.pid, busy.pid],
            "children": [child for child, _ in families],
            "grandchildren": [grandchild for _, grandchild in families],
        }
        print(json.dumps(report), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
