"""``python -m trio_fork demo``: a short tour of what the library does."""

from __future__ import annotations

import os
import sys
import time

import anyio

from ._errors import RemoteError
from ._open import open_template
from ._template import Template

# Worker code is defined in the template with eval(), so this module never has to
# be imported there; children find the functions in the template's __main__.
_WORKERS = """
import json, os

def greet(sock, name):
    sock.sendall(json.dumps({"hello": name, "pid": os.getpid()}).encode())

def square(sock, number):
    sock.sendall(str(number * number).encode())

def write_line(sock, prefix, fd, number):
    os.write(fd, f"{prefix} {number} from pid {os.getpid()}\\n".encode())

def wait_forever(sock):
    sock.sendall(b"ready")
    import time
    while True:
        time.sleep(60)

def divide(sock, a, b):
    sock.sendall(str(a / b).encode())
"""


def _step(number: int, text: str) -> None:
    print(f"\n{number}. {text}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


async def _demo() -> None:
    started = time.perf_counter()
    async with open_template(preload=["json", "decimal"]) as template:
        _step(1, "A template: a small Python process that has imported what workers need")
        print(f"   open_template(preload=['json', 'decimal']): pid {template.pid}, ", end="")
        print(f"ready in {_ms(time.perf_counter() - started)}")
        await template.eval(_WORKERS)

        _step(2, "spawn() forks it and runs a function with a socket back to us")
        async with template.spawn("__main__:greet", "world") as child:
            print(f"   child {child.pid} says {(await child.stream.receive()).decode()}")
        print(f"   and exited with status {child.returncode}")

        await _many(template)
        await _specialised(template)
        await _errors(template)
        await _cancellation(template)
    elapsed = _ms(time.perf_counter() - started)
    print(
        f"\nLeaving open_template ended the template and everything it started ({elapsed} in all)."
    )


async def _many(template: Template) -> None:
    _step(3, "Forking is cheap: 40 children at once")
    results: list[int] = []

    async def one(number: int) -> None:
        async with template.spawn("__main__:square", number) as child:
            results.append(int(await child.stream.receive()))

    started = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for number in range(40):
            task_group.start_soon(one, number)
    elapsed = time.perf_counter() - started
    print(f"   40 children, 40 answers (sum of squares {sum(results)}) in {_ms(elapsed)}")
    started = time.perf_counter()
    await anyio.run_process([sys.executable, "-c", "import json, decimal"])
    elapsed = time.perf_counter() - started
    print(f"   for comparison, one fresh interpreter importing the same: {_ms(elapsed)}")


async def _specialised(template: Template) -> None:
    _step(4, "fork() a specialised template; queue arguments and a pipe for all its children")
    read_end, write_end = os.pipe()
    try:
        async with template.fork() as forked:
            await forked.send_args("line")
            await forked.send_fds(write_end)
            for number in range(3):
                async with forked.spawn("__main__:write_line", number):
                    pass
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as pipe:
            read_end = -1
            for line in pipe.read().decode().splitlines():
                print(f"   from the pipe: {line}")
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


async def _errors(template: Template) -> None:
    _step(5, "Failures come back as RemoteError, with the remote traceback")
    try:
        await template.require("a_module_that_does_not_exist")
    except RemoteError as exc:
        print(f"   require(...): RemoteError {exc.type_name}: {exc.message}")
    async with template.spawn("__main__:divide", 1, 0) as child:
        pass
    print(
        f"   a child that raised exited with status {child.returncode} (traceback on stderr above)"
    )


async def _cancellation(template: Template) -> None:
    _step(6, "Structured: cancelling a block kills its child and waits until it is reaped")
    with anyio.move_on_after(0.2):
        async with template.spawn("__main__:wait_forever") as child:
            await child.stream.receive()
            print(f"   child {child.pid} is running; cancelling in 0.2 s")
            await anyio.sleep_forever()
    print(f"   child {child.pid}: exit status {child.returncode} (killed by SIGKILL)")


def run(backend: str) -> int:
    print(f"trio_fork demo, on {backend}")
    anyio.run(_demo, backend=backend)
    return 0
