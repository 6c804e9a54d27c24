"""``python -m trio_fork bench --remote COMMAND``: remote templates against their peers.

Four figures, each side by side with its peer in the same run, over the same sshd:
a new remote worker ready (trio_fork's remote spawn of an RPC worker and its first
call, against ``execnet.makegateway`` and a first call); sequential call round trips
to one remote worker (trio_fork's RPC against an execnet channel's send and
receive, and against two floors: a bare echo over the same ssh, and one through a
second process there); a child streaming 1 GiB (against raw ``ssh host head -c 1G /dev/zero``);
and the spawn rate of a remote template against a local one's. Each figure is the
median of its samples, peers and trio_fork sampled in turn.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio

from .._open import open_template
from .._remote import RemoteTemplate, open_remote_template
from .._rpc import open_rpc
from .._template import Template

_GIB = 1 << 30
_STREAM_CODE = (
    "def stream(sock, size):\n"
    "    data = bytes(1 << 20)\n"
    "    for _ in range(size >> 20):\n"
    "        sock.sendall(data)\n"
)


def _execnet_spec(command: Sequence[str], python: str) -> str:
    """execnet's spec for the same ssh command: ``ssh=ARGS HOST//python=PYTHON``."""
    if not command or os.path.basename(command[0]) != "ssh":
        raise ValueError("the execnet rows need an ssh command (ssh [options] host)")
    return f"ssh={' '.join(command[1:])}//python={python}"


async def _median(samples: int, measure: Callable[[], Awaitable[float]]) -> float:
    return statistics.median([await measure() for _ in range(samples)])


def _read_all(command: list[str]) -> float:
    """Seconds to read everything ``command`` writes to its stdout."""
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        buffer = bytearray(1 << 20)
        fd = process.stdout.fileno()
        while os.readv(fd, [buffer]):
            pass
    return time.perf_counter() - started


async def measure(
    command: Sequence[str], python: str, quick: bool
) -> list[tuple[str, float, str, float, str]]:
    """Rows: (figure, trio_fork's value, peer, peer's value, unit)."""
    import execnet

    samples = 3 if quick else 7
    calls_seconds = 0.5 if quick else 2.0
    stream_size = _GIB // 8 if quick else _GIB
    spec = _execnet_spec(command, python)
    rows = []
    async with open_remote_template(command, python=python) as template:
        await template.require("trio_fork.worker._rpc", "math")

        async def remote_worker() -> float:
            started = time.perf_counter()
            async with open_rpc(template, "math:factorial") as rpc:
                await rpc.call(1)
                return time.perf_counter() - started

        def execnet_gateway() -> float:
            started = time.perf_counter()
            gateway = execnet.makegateway(spec)
            gateway.remote_exec("channel.send(1)").receive()
            elapsed = time.perf_counter() - started
            gateway.exit()
            return elapsed

        await remote_worker()
        ours = await _median(samples, remote_worker)
        peer = await _median(samples, lambda: anyio.to_thread.run_sync(execnet_gateway))
        rows.append(("new remote worker ready", ours * 1e3, "execnet", peer * 1e3, "ms"))

        rows += await _round_trips(template, command, python, samples, calls_seconds)

        await template.eval(_STREAM_CODE)
        size = f"{stream_size >> 20}M"
        raw = [*command, shlex.join(["head", "-c", size, "/dev/zero"])]

        async def child_stream() -> float:
            started = time.perf_counter()
            async with template.spawn("__main__:stream", stream_size) as child:
                while True:
                    try:
                        await child.stream.receive(1 << 20)  # as the raw peer reads
                    except anyio.EndOfStream:
                        break
            return time.perf_counter() - started

        ours = await _median(samples, child_stream)
        peer = await _median(samples, lambda: anyio.to_thread.run_sync(_read_all, raw))
        mib = stream_size / (1 << 20)
        rows.append(
            (f"a child streaming {size}", mib / ours, "raw ssh head -c", mib / peer, "MiB/s")
        )

        remote_rate = await _median(samples, lambda: _spawn_rate(template, quick))
    async with open_template() as local:
        local_rate = await _median(samples, lambda: _spawn_rate(local, quick))
    rows.append(("spawn rate, 32 at once", remote_rate, "local template", local_rate, "/s"))
    return rows


# What a remote Python runs for the floors: echo what comes, at once; with a hop,
# through a second process over a socketpair, as the relay passes a call to a worker.
_ECHO = "import os\nwhile d := os.read(0, 100):\n    os.write(1, d)"
_ECHO_HOP = (
    "import os, socket\n"
    "a, b = socket.socketpair()\n"
    "if os.fork() == 0:\n"
    "    a.close()\n"
    "    while d := b.recv(100):\n"
    "        b.send(d)\n"
    "    os._exit(0)\n"
    "b.close()\n"
    "while d := os.read(0, 100):\n"
    "    a.send(d)\n"
    "    os.write(1, a.recv(100))\n"
)


async def _round_trips(
    template: RemoteTemplate, command: Sequence[str], python: str, samples: int, seconds: float
) -> list[tuple[str, float, str, float, str]]:
    """Sequential round trips to one remote worker, against execnet's and two floors.

    The samples of each are taken in turn (ours, execnet's, each floor's), so that a
    change in the machine's load hits them alike. The floors are what any design
    over ssh pays: an echo by the Python at the other end, and one through a second
    process there (as a relay passes a call to a worker, and the answer back).
    """
    import execnet

    gateway = execnet.makegateway(_execnet_spec(command, python))
    channel = gateway.remote_exec("while 1:\n    channel.send(channel.receive())")

    def channel_rate() -> float:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            channel.send(1)
            channel.receive()
            count += 1
        return count / (time.perf_counter() - started)

    peers: dict[str, list[float]] = {
        "execnet channel": [],
        "raw ssh echo (floor)": [],
        "ssh echo via 2nd process": [],
    }
    ours = []
    try:
        async with open_rpc(template, "math:factorial") as rpc:
            for _ in range(samples):
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    await rpc.call(1)
                    count += 1
                ours.append(count / (time.perf_counter() - started))
                peers["execnet channel"].append(await anyio.to_thread.run_sync(channel_rate))
                for name, hop in (
                    ("raw ssh echo (floor)", False),
                    ("ssh echo via 2nd process", True),
                ):
                    peers[name].append(
                        await anyio.to_thread.run_sync(_echo_rate, [*command, python], seconds, hop)
                    )
    finally:
        gateway.exit()
    rate = statistics.median(ours)
    return [
        ("sequential call round trips", rate, name, statistics.median(values), "/s")
        for name, values in peers.items()
    ]


def _echo_rate(command: list[str], seconds: float, hop: bool = False) -> float:
    """Round trips of a few bytes through ssh to a Python that echoes them: a floor."""
    with subprocess.Popen(
        [*command[:-1], shlex.join([command[-1], "-c", _ECHO_HOP if hop else _ECHO])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    ) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        write, read = process.stdin.fileno(), process.stdout.fileno()
        os.write(write, b"x")  # the connection is made: not part of the figure
        os.read(read, 100)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.write(write, b"x" * 40)
            os.read(read, 100)
            count += 1
        rate = count / (time.perf_counter() - started)
        process.stdin.close()
    return rate


async def _spawn_rate(template: RemoteTemplate | Template, quick: bool) -> float:
    count = 200 if quick else 1000
    limit = anyio.Semaphore(32)

    async def one() -> None:
        async with limit, template.spawn("socket:socket.close"):
            pass

    started = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for _ in range(count):
            task_group.start_soon(one)
    return count / (time.perf_counter() - started)


def render(rows: list[tuple[str, float, str, float, str]]) -> str:
    lines = [
        "Remote templates (over one sshd, each figure side by side with its peer)",
        f"{'figure':32} {'trio_fork':>12} {'peer':>24} {'ratio':>8}",
    ]
    for figure, ours, peer_name, peer, unit in rows:
        # For times, smaller is better: the ratio says how many times faster.
        ratio = peer / ours if unit == "ms" else ours / peer
        lines.append(
            f"{figure:32} {ours:>9.1f} {unit:<3}"
            f"{peer_name + ' ' + format(peer, '.1f'):>21} {unit:<3}{ratio:>6.2f}x"
        )
    return "\n".join(lines) + "\n"


def run(command: str, python: str, *, quick: bool, backend: str) -> int:
    rows = anyio.run(measure, shlex.split(command), python, quick, backend=backend)
    print(render(rows), end="")
    return 0
