"""A parent that builds a tree of templates and children, reports it, and waits.

Run as ``python -m tests.scripts.tree BACKEND`` from the repository root. Prints one
JSON line: this process's pid, the templates' pids, the children's pids, and the
default template's pid (null with ``TRIO_FORK_DEFAULT_TEMPLATE=0``: the templates are
then this process's children). One template is busy in a long command, to show that
it still goes away.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

import trio_fork
from tests import targets
from tests.helpers import receive
from trio_fork import _open


async def hold(template: trio_fork.Template, pids: list[int], ready: anyio.Event) -> None:
    async with template.spawn(targets.sleep_forever) as child:
        pids.append(await receive(child.stream))
        ready.set()
        await anyio.sleep_forever()


async def main() -> None:
    children: list[int] = []
    async with (
        trio_fork.open_template(preload=["tests.targets"]) as template,
        trio_fork.open_template() as busy,
        template.fork() as forked,
        anyio.create_task_group() as task_group,
    ):
        for owner in (template, template, forked, forked):
            ready = anyio.Event()
            task_group.start_soon(hold, owner, children, ready)
            await ready.wait()
        task_group.start_soon(busy.eval, "import time; time.sleep(600)")
        await anyio.sleep(0.1)
        report = {
            "parent": os.getpid(),
            "templates": [template.pid, busy.pid, forked.pid],
            "children": children,
            "default": _open._default.handle.pid if _open._default.handle else None,
        }
        print(json.dumps(report), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
