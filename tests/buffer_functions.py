"""What workers run in tests/test_large_data.py: arrays in and out, and where they live."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import numpy as np

MIB = 1 << 20


def where(buffer: Any) -> tuple[str, int] | None:
    """The mapping holding ``buffer`` (its path and inode), or None if it is on the heap."""
    address = np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]
    with open("/proc/self/maps") as file:
        for line in file:
            fields = line.split(maxsplit=5)
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) > 5 else ""
                return (path, int(fields[4])) if path.startswith("/memfd:") else None
    return None


def inspect(array: Any, write: bool = False) -> tuple[float, Any, bool]:
    """The sum of ``array``, where it lives, whether it can be written (and write it)."""
    total = float(array.sum())
    if write:
        array[...] = 255
    return total, where(array), bool(array.flags.writeable)


def make(size: int, value: int = 7) -> Any:
    return np.full(size, value, dtype=np.uint8)


def double(array: Any) -> Any:
    return array * 2


def identity(value: Any) -> Any:
    return value


def fill(array: Any, value: int) -> None:
    array[...] = value


async def async_double(array: Any) -> Any:
    return array * 2


def emit_arrays(emit: Any, count: int, size: int) -> int:
    for index in range(count):
        emit(np.full(size, index, dtype=np.uint8))
    return count


def shared_result(size: int) -> Any:
    import trio_fork

    array = trio_fork.shared_array(size, np.uint8)
    array[...] = 5
    return array


def die_holding(array: Any) -> None:
    """Die (SIGKILL) with the argument mapped: it must go with the process."""
    assert where(array) is not None
    os.kill(os.getpid(), signal.SIGKILL)


def die_after_emitting(emit: Any, size: int) -> None:
    emit(np.ones(size, dtype=np.uint8))
    os.kill(os.getpid(), signal.SIGKILL)


def report_arrays(sock: socket.socket, *args: Any) -> None:
    """A spawn target: what it got (queued, then given), as sums and where they live."""
    import pickle

    report = [
        (float(arg.sum()), where(arg)) if isinstance(arg, np.ndarray) else arg for arg in args
    ]
    sock.sendall(pickle.dumps(report))


def emit_outside(size: int) -> int:
    """Send an array as an event that belongs to no call (the child-side emit)."""
    from trio_fork.worker import emit

    emit(np.full(size, 4, dtype=np.uint8))
    return size


def hold(array: Any, seconds: float) -> float:
    """Hold the argument mapped for a while (to be cancelled meanwhile)."""
    import time

    time.sleep(seconds)
    return float(array[0])


def count_mapped(arrays: list[Any]) -> tuple[int, int]:
    """How many arrays came, and how many of them on mappings."""
    return len(arrays), sum(where(array) is not None for array in arrays)


def many(count: int, size: int) -> list[Any]:
    return [np.full(size, index % 256, dtype=np.uint8) for index in range(count)]


_kept: list[Any] = []


def keep(array: Any) -> Any:
    """Keep the argument, mapped, after the call; where it lives."""
    _kept.append(array)
    return where(array)


def kept() -> list[tuple[int, int]]:
    """The first and last byte of each array kept; and let go of them."""
    values = [(int(array[0]), int(array[-1])) for array in _kept]
    _kept.clear()
    return values


def let_go_slowly(array: Any) -> Any:
    """Where the argument lives; letting go of it, once called, takes half a second."""
    import time
    import weakref

    # On what holds the mapping, which outlives the array while the call's buffers do.
    owner = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if isinstance(owner.base, memoryview):
        owner = owner.base.obj
    weakref.finalize(owner, time.sleep, 0.5)
    return where(array)


async def let_go_slowly_async(array: Any) -> Any:
    return let_go_slowly(array)


def faults_reading(array: Any) -> tuple[int, int]:
    """The page faults taken to read all of ``array``, and its first byte."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    array.max()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, int(array[0])
