"""Buffers already in shared memory: sent to workers by descriptor, with no copy at all.

A big argument or result is copied once, into a sealed memfd, on its way to another
process (:mod:`trio_fork.worker._buffers`). Data that is made to be sent can skip even
that copy by living in a memfd from the start: :func:`shared_buffer` and
:func:`shared_array` allocate there. Like any argument, what a worker receives is its
own (a private, copy-on-write mapping), unless the buffer was made with
``shared_writes=True``: then the worker maps it shared, and what it writes is seen by
the caller, as with joblib's writable memmaps.

Standard library only, but for numpy in :func:`shared_array`, imported there: a
worker may import this module to return a shared buffer of its own.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import operator
import os
import pickle

from .worker import _buffers, _mappings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

DEFAULT_BUFFER_THRESHOLD = _buffers.THRESHOLD
"""Buffers of at least this many bytes go out of band by default (1 MiB)."""


def shared_buffer(size: int, *, shared_writes: bool = False) -> pickle.PickleBuffer:
    """Allocate ``size`` bytes of shared memory that workers receive without a copy.

    The memory is zeroed, writable here (``memoryview(buffer)``, or
    ``numpy.frombuffer(buffer, dtype)``), and sent by descriptor when passed as an
    argument or returned as a result of at least the buffer threshold: the receiver
    maps the same pages, so the time to send it does not depend on its size. It
    arrives as a :class:`memoryview` on the mapping. It is freed when the last object
    using it, in any process, is collected.

    A receiver's mapping is private by default: what it writes stays its own
    (copy-on-write), but what you write here while it runs may or may not be seen
    there, page by page; do not write to a buffer that a running call received.

    Args:
        size: Bytes, at least 1.
        shared_writes: Let every process it is sent to write into it: they map it
            shared, and you see what they write (results written in place).

    Raises:
        ValueError: ``size`` is below 1.
        OSError: The memory cannot be allocated.
    """
    size = operator.index(size)
    if size < 1:
        raise ValueError(f"shared_buffer: size must be at least 1 byte, not {size}")
    fd = os.memfd_create("trio_fork shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Never shrunk under a mapping (which would crash its reader), nor grown.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _buffers.FIXED)
        region = mmap.mmap(fd, size, **_mappings.UNTRACKED)
        if not shared_writes:
            # Receivers get a read-only descriptor: they can only map it privately.
            read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.close(fd)
            fd = read_only
    except BaseException:
        os.close(fd)
        raise
    mode = _mappings.SHARED if shared_writes else _mappings.PRIVATE
    _mappings.register(region, 0, fd, mode, False)
    return pickle.PickleBuffer(memoryview(region))


def shared_array(
    shape: int | tuple[int, ...],
    dtype: Any = float,
    *,
    order: Literal["C", "F"] = "C",
    shared_writes: bool = False,
) -> Any:
    """A zeroed numpy array on a :func:`shared_buffer`: sent by descriptor, never copied.

    Workers receive it as an array on the same pages (privately mapped unless
    ``shared_writes``), and an array that a worker returns on a mapping is sent on
    the same way. Needs numpy.

    Args:
        shape: As for :func:`numpy.zeros`; the array has at least one element.
        dtype: As for :func:`numpy.zeros`.
        order: ``"C"`` or ``"F"``.
        shared_writes: See :func:`shared_buffer`.

    Raises:
        ImportError: numpy is not installed.
        ValueError: The array would be empty.
    """
    import numpy

    if order not in ("C", "F"):
        raise ValueError(f"shared_array: order must be 'C' or 'F', not {order!r}")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    kind = numpy.dtype(dtype)
    size = math.prod(dims) * kind.itemsize
    if size < 1:
        raise ValueError(f"shared_array: an array of shape {dims} and {kind} holds no bytes")
    buffer = shared_buffer(size, shared_writes=shared_writes)
    array: Any = numpy.ndarray(dims, kind, buffer=memoryview(buffer), order=order)
    return array


def check_threshold(threshold: int | None, where: str) -> int | None:
    """``threshold`` if it is a valid ``buffer_threshold``, else a clear error.

    ``where`` (the function's name) starts the message, if given.
    """
    if threshold is None:
        return None
    prefix = f"{where}: " if where else ""
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(
            f"{prefix}buffer_threshold must be a number of bytes or None, "
            f"not {type(threshold).__name__}"
        )
    if threshold < 1:
        raise ValueError(f"{prefix}buffer_threshold must be at least 1 byte, not {threshold}")
    return threshold
