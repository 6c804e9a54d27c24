"""Big buffers out of band: pickle protocol 5 buffers in sealed memfds. Stdlib only.

Pickling a big array copies it into the pickle; the socket copies it twice more, and
unpickling once more. Here each buffer of at least ``threshold`` bytes is instead
copied once into a memfd, sealed (nobody can write, shrink or grow it any more) and
sent as a descriptor with its frame; the receiver maps it privately (copy-on-write:
its writes stay its own) and unpickles on top of the mapping. A buffer that already
lives in a memfd goes by its descriptor with no copy at all: a shared buffer
(``trio_fork.shared_buffer``), or a mapping received and not written to since (the page
table, ``/proc/self/pagemap``, tells which pages were written).

Memory lives as long as the objects on it: a mapping is unmapped, and the descriptor
kept for sending it on is closed, when the last object using it is collected.
Nothing has a name, nothing is in ``/dev/shm``, and a descriptor lost in transit
(cancelled, or its receiver dead) is freed by the kernel with the socket.

A payload with buffers starts with a table: a zero byte, the count, then offset,
length and mode of each buffer, in the order of the frame's descriptors; the pickle
follows. A payload without is a plain pickle, which starts with PROTO (0x80).
"""

from __future__ import annotations

import _weakref
import fcntl
import mmap
import os
import pickle
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

THRESHOLD = 1 << 20
"""Buffers of at least this many bytes go out of band, by default."""
PRIVATE, SHARED = 0, 1  # how the receiver maps a buffer: copy-on-write, or shared
_HEAD = struct.Struct("<BI")  # 0, number of buffers
_ENTRY = struct.Struct("<QQB")  # offset in the memfd, length, mode
_PAGE = mmap.PAGESIZE
_PLAIN = frozenset((int, float, complex, str, bytes, bool, type(None)))
FIXED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_FROZEN = FIXED | fcntl.F_SEAL_WRITE
# mmap keeps a duplicate of the descriptor unless told not to (Python 3.13+).
UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
# The last byte of a pagemap entry: bit 63 present, 62 swapped, 61 a file's page. A
# page of a private mapping that is swapped, or present and no longer the file's, was
# written to.
_WRITTEN = bytes(int(bool(b & 0x40) or b & 0xA0 == 0x80) for b in range(256))

# Mappings whose descriptor is known: start address -> (end, memfd offset of start,
# descriptor, mode to send it with, whether ours is private, weak reference).
_regions: dict[int, tuple[int, int, int, int, bool, Any]] = {}


def dumps(obj: Any, threshold: int | None = THRESHOLD) -> tuple[bytes, list[int]]:
    """``obj`` pickled, with its buffers of ``threshold`` bytes or more out of band.

    Returns the payload and the descriptors to send with it, which the caller owns.
    """
    # The small values of most calls surely hold no buffer: pickled the short way.
    kind = type(obj)
    if threshold is None or kind in _PLAIN:
        return pickle.dumps(obj, 5), []
    if kind is tuple and len(obj) <= 8:
        for item in obj:
            if type(item) not in _PLAIN:
                break
        else:
            return pickle.dumps(obj, 5), []
    fds: list[int] = []
    table: list[bytes] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        with buffer.raw() as view:
            length = view.nbytes
            if length < threshold:
                return True
            found = _descriptor(view, length)
            fd, offset, mode = found or (_copy(view), 0, PRIVATE)
        fds.append(fd)
        table.append(_ENTRY.pack(offset, length, mode))
        return False

    try:
        data = pickle.dumps(obj, 5, buffer_callback=out_of_band)
    except BaseException:
        _close(fds)
        raise
    if not fds:
        return data, fds
    return b"".join([_HEAD.pack(0, len(fds)), *table, data]), fds


class Dumped(tuple):  # type: ignore[type-arg]
    """``(payload, fds)``: a value pickled already, as :func:`dumps` returns it."""

    __slots__ = ()


def receive(payload: bytes, fds: list[int]) -> tuple[Any, list[memoryview]]:
    """The pickle of a payload and its buffers, mapped; takes ownership of ``fds``.

    Raises:
        ValueError: The table does not match the descriptors, or one of them is not
            a sealed memfd of the size the table says (all ``fds`` are closed).
    """
    if not fds:
        if payload[:1] == b"\0":
            raise ValueError("a payload with buffers came without their descriptors")
        return payload, []
    buffers: list[memoryview] = []
    try:
        zero, count = _HEAD.unpack_from(payload)
        if zero or count != len(fds):
            raise ValueError(f"{len(fds)} descriptors came with a table of {count} buffers")
        for index in range(count):
            fd, fds[index] = fds[index], -1
            buffers.append(_map(fd, *_ENTRY.unpack_from(payload, _HEAD.size + index * _ENTRY.size)))
    except (struct.error, OSError) as exc:
        raise ValueError(f"the buffers of a payload cannot be mapped: {exc}") from None
    finally:
        _close(fds)
        fds.clear()
    return memoryview(payload)[_HEAD.size + count * _ENTRY.size :], buffers


def take(payload: bytes, fds: list[int]) -> list[int]:
    """The descriptors of a payload's buffers: the last of ``fds``, taken out of it."""
    count = _HEAD.unpack_from(payload)[1] if payload[:1] == b"\0" else 0
    taken = fds[len(fds) - count :] if count else []
    del fds[len(fds) - len(taken) :]
    return taken


def loads(data: Any, buffers: Iterable[memoryview]) -> Any:
    """Unpickle what :func:`receive` returned."""
    return pickle.loads(data, buffers=buffers)


def _copy(view: memoryview) -> int:
    """A sealed memfd holding a copy of ``view``."""
    fd = os.memfd_create("trio_fork buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _FROZEN)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int, offset: int, length: int, mode: int) -> memoryview:
    """Map ``length`` bytes at ``offset`` of a received memfd; ``fd`` is taken."""
    try:
        if not (
            length
            and mode in (PRIVATE, SHARED)
            and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            and os.fstat(fd).st_size >= offset + length
        ):
            # Unsealed, its owner could shrink it under the mapping: SIGBUS here.
            raise ValueError("a buffer's descriptor is not a sealed memfd of its size")
        start = offset - offset % _PAGE
        flags = mmap.MAP_SHARED if mode == SHARED else mmap.MAP_PRIVATE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        region = mmap.mmap(fd, offset + length - start, flags, prot, offset=start, **UNTRACKED)
    except BaseException:
        os.close(fd)
        raise
    register(region, start, fd, mode, mode == PRIVATE)
    return memoryview(region)[offset - start :]


def register(region: mmap.mmap, offset: int, fd: int, mode: int, private: bool) -> None:
    """Know ``region``'s descriptor from now until it is collected (which closes it)."""
    address = _address(region)
    ref = _weakref.ref(region, lambda _: _forget(address))
    _regions[address] = (address + len(region), offset, fd, mode, private, ref)


def _forget(address: int) -> None:
    entry = _regions.pop(address, None)
    if entry is not None:
        _close([entry[2]])


def _address(buffer: Any) -> int:
    import ctypes  # only once there are mappings: templates load it anyway (prctl)

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _descriptor(view: memoryview, length: int) -> tuple[int, int, int] | None:
    """A descriptor, offset and mode that send ``view`` with no copy; None if none do."""
    if not _regions:
        return None
    interface = getattr(view.obj, "__array_interface__", None)
    if interface is not None:
        address = interface["data"][0]
    elif view.readonly:
        return None  # no address to be had without a C helper: it is copied
    else:
        address = _address(view)
    # A copy: collecting a mapping (a weak reference's callback) changes the dict.
    for start, (end, offset, fd, mode, private, _) in list(_regions.items()):
        if start <= address and address + length <= end:
            if private and _written(address, length):
                return None
            return os.dup(fd), offset + address - start, mode
    return None


def _written(address: int, length: int) -> bool:
    """Whether a page of a private mapping in this range was written to (or unknown)."""
    first = address // _PAGE
    count = (address + length - 1) // _PAGE - first + 1
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entries = os.pread(fd, count * 8, first * 8)
        finally:
            os.close(fd)
    except OSError:
        return True
    return len(entries) != count * 8 or b"\1" in entries[7::8].translate(_WRITTEN)


def _close(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
