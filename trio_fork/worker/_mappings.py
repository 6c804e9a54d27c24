"""Received buffers, mapped: what each was sent with, and mappings kept for reuse. Stdlib only.

A buffer arrives as a descriptor of a sealed memfd (see :mod:`._buffers`); it is
mapped here, privately (copy-on-write: the receiver's writes stay its own) or
shared, and known by its address until the last object on it is collected, so that
it can be sent on by its descriptor.

Mapping costs more than it looks: the kernel fills a page-table entry for every
4 KiB page on first touch (shared memory gets no huge pages unless the machine is
set up so), about 22 ms for 256 MiB here, as much as copying them. A sender that
reuses its memfds (one that pools, see ``_buffers._Pool``) sends the same memfd
call after call, with new contents. So a process that pools too keeps the private
mapping of such a memfd once nobody uses it, if it is still clean (no page written,
which the page table tells), and maps the next sending of that memfd there: its
page-table entries still point at the memfd's pages, where the new contents are.

The kept mapping must not hold the memfd as a reader: the sender reuses a memfd
once every read-only file of it is closed (inotify's ``IN_CLOSE_NOWRITE``). So it
is made from a read-write file of our own, whose close the sender does not count,
and the descriptor that came, a reader, is held while the buffer is used.
"""

from __future__ import annotations

import _weakref
import fcntl
import mmap
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PRIVATE, SHARED = 0, 1  # how the receiver maps a buffer: copy-on-write, or shared
PAGE = mmap.PAGESIZE
# mmap keeps a duplicate of the descriptor unless told not to (Python 3.13+).
UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
# The last byte of a pagemap entry: bit 63 present, 62 swapped, 61 a file's page. A
# page of a private mapping that is swapped, or present and no longer the file's, was
# written to.
_WRITTEN = bytes(int(bool(b & 0x40) or b & 0xA0 == 0x80) for b in range(256))
_KEPT = 8  # clean mappings kept at most, idle
_KEPT_BYTES = 1 << 30  # and bytes at most

# Mappings whose descriptor is known: start address -> (end, memfd offset of start,
# descriptor, mode to send it with, whether ours is private, weak reference).
regions: dict[int, tuple[int, int, int, int, bool, Any]] = {}
_alive: dict[int, Any] = {}  # their weak references, by id, until each one's callback


class _Kept:
    """Clean private mappings of reused memfds that nobody uses, by the memfd's inode."""

    def __init__(self) -> None:
        self.idle: dict[int, tuple[mmap.mmap, int]] = {}  # inode -> (mapping, receipt)
        self.receipts = 0  # receipts of reusable memfds
        self.era = 0  # changes when the kept mappings are dropped: older ones stay out

    def take(self, inode: int, size: int) -> mmap.mmap | None:
        self.receipts += 1
        found = self.idle.pop(inode, None)
        # Those the last two receipts did not use, as the sender's pool frees its own. A
        # copy: collecting a buffer's objects (a weak reference's callback) changes it.
        for key, (_, receipt) in list(self.idle.items()):
            if receipt < self.receipts - 2:
                self.idle.pop(key, None)
        return found[0] if found is not None and len(found[0]) == size else None

    def keep(self, inode: int, region: mmap.mmap, era: int) -> None:
        if era != self.era:
            return
        self.idle[inode] = (region, self.receipts)
        while (
            len(self.idle) > _KEPT or sum(len(r) for r, _ in list(self.idle.values())) > _KEPT_BYTES
        ):
            self.idle.pop(next(iter(self.idle)), None)

    def drop(self) -> None:
        """Unmap them all (their objects go): this process stops pooling, or is a new child."""
        self.era += 1
        self.idle.clear()


kept = _Kept()


def map_received(fd: int, offset: int, length: int, mode: int, reuse: bool) -> memoryview:
    """Map ``length`` bytes at ``offset`` of a received memfd; ``fd`` is taken.

    ``reuse``: this process pools, and may keep the mapping of a reused memfd.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        info = os.fstat(fd)
        if not (
            length
            and mode in (PRIVATE, SHARED)
            and seals & fcntl.F_SEAL_SHRINK
            and info.st_size >= offset + length
        ):
            # Unsealed, its owner could shrink it under the mapping: SIGBUS here.
            raise ValueError("a buffer's descriptor is not a sealed memfd of its size")
        if reuse and mode == PRIVATE and not seals & fcntl.F_SEAL_WRITE:
            mapped = _map_reusable(fd, offset, length, info.st_ino, info.st_size)
            if mapped is not None:
                return mapped
        start = offset - offset % PAGE
        flags = mmap.MAP_SHARED if mode == SHARED else mmap.MAP_PRIVATE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        region = mmap.mmap(fd, offset + length - start, flags, prot, offset=start, **UNTRACKED)
    except BaseException:
        os.close(fd)
        raise
    register(region, start, fd, mode, mode == PRIVATE)
    return memoryview(region)[offset - start :]


def _map_reusable(fd: int, offset: int, length: int, inode: int, size: int) -> memoryview | None:
    """A memfd that its sender writes again: on the mapping kept of it, if there is one.

    None if there is none and no file of our own can be had (no ``/proc``).
    """
    import ctypes

    region = kept.take(inode, size)
    if region is None:
        try:
            writer = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            region = mmap.mmap(writer, size, mmap.MAP_PRIVATE, prot, **UNTRACKED)
        finally:
            os.close(writer)
    # The objects on the buffer hold this view of the mapping, not the mapping: when
    # it is collected, the mapping may be kept.
    users = (ctypes.c_char * size).from_buffer(region)
    address = ctypes.addressof(users)
    era = kept.era

    def release(dead: Any) -> None:
        clean = not _written(address, size)
        _forget(address, fd, dead)  # the sender may write it again from now
        if clean:
            kept.keep(inode, region, era)

    _track(users, address, size, (0, fd, PRIVATE, True), release)
    return memoryview(users).cast("B")[offset : offset + length]


def register(region: mmap.mmap, offset: int, fd: int, mode: int, private: bool) -> None:
    """Know ``region``'s descriptor from now until it is collected (which closes it)."""
    address = _address(region)
    _track(region, address, len(region), (offset, fd, mode, private), None)


def _track(
    owner: Any, address: int, size: int, entry: tuple[int, int, int, bool], release: Any
) -> None:
    """Know ``owner`` at ``address`` by ``entry`` (offset, fd, mode, private) while it lives."""
    fd = entry[1]
    if release is None:
        ref = _weakref.ref(owner, lambda dead: _forget(address, fd, dead))
    else:
        ref = _weakref.ref(owner, release)
    _alive[id(ref)] = ref
    regions[address] = (address + size, *entry, ref)


def _forget(address: int, fd: int, ref: Any) -> None:
    # mmap unmaps before its weak references die, without the GIL: another thread
    # may have mapped the same address and registered it meanwhile. Its entry stays
    # (and this weak reference lives on in _alive, or its callback would never run);
    # this one's descriptor is closed all the same.
    _alive.pop(id(ref), None)
    entry = regions.get(address)
    if entry is not None and entry[5] is ref:
        del regions[address]
    try:
        os.close(fd)
    except OSError:
        pass


def _address(buffer: Any) -> int:
    import ctypes  # only once there are mappings: templates load it anyway (prctl)

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def descriptor(view: memoryview, length: int) -> tuple[int, int, int] | None:
    """A descriptor, offset and mode that send ``view`` with no copy; None if none do."""
    if not regions:
        return None
    interface = getattr(view.obj, "__array_interface__", None)
    if interface is not None:
        address = interface["data"][0]
    elif view.readonly:
        return None  # no address to be had without a C helper: it is copied
    else:
        address = _address(view)
    # A copy: collecting a mapping (a weak reference's callback) changes the dict.
    for start, (end, offset, fd, mode, private, _) in list(regions.items()):
        if start <= address and address + length <= end:
            if private and _written(address, length):
                return None
            return os.dup(fd), offset + address - start, mode
    return None


def _written(address: int, length: int) -> bool:
    """Whether a page of a private mapping in this range was written to (or unknown)."""
    first = address // PAGE
    count = (address + length - 1) // PAGE - first + 1
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entries = os.pread(fd, count * 8, first * 8)
        finally:
            os.close(fd)
    except OSError:
        return True
    return len(entries) != count * 8 or b"\1" in entries[7::8].translate(_WRITTEN)
