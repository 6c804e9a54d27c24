"""Big buffers out of band: pickle protocol 5 buffers in sealed memfds. Stdlib only.

Pickling a big array copies it into the pickle; the socket copies it twice more, and
unpickling once more. Here each buffer of at least ``threshold`` bytes is instead
copied once into a memfd, sealed (nobody can shrink or grow it any more; nor write
it, unless it is one that :class:`_Pool` reuses) and sent as a descriptor with its
frame; the receiver maps it privately (copy-on-write:
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

import _thread
import fcntl
import mmap
import os
import pickle
import struct
import sys

from ._mappings import PRIVATE, UNTRACKED, descriptor, kept, map_received

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

THRESHOLD = 1 << 20
"""Buffers of at least this many bytes go out of band, by default."""
_HEAD = struct.Struct("<BI")  # 0, number of buffers
_ENTRY = struct.Struct("<QQB")  # offset in the memfd, length, mode
PLAIN = frozenset((int, float, complex, str, bytes, bool, type(None)))  # hold no buffer
FIXED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_FROZEN = FIXED | fcntl.F_SEAL_WRITE


def dumps(obj: Any, threshold: int | None = THRESHOLD) -> tuple[bytes, list[int]]:
    """``obj`` pickled, with its buffers of ``threshold`` bytes or more out of band.

    Returns the payload and the descriptors to send with it, which the caller owns.
    """
    if threshold is None:
        return pickle.dumps(obj, 5), []
    # Most values hold no big buffer: pickled once, by a pickler that gives up at the
    # first big one, then the full way from the start. As fast as checking for values
    # of plain types was (0.4 us for a call's (1,)), and 0.2 us less than the full way
    # for a dict or a small bytearray, which that check sent the full way.
    try:
        return pickle.dumps(obj, 5, buffer_callback=_in_band(threshold)), []
    except _Big:
        pass
    fds: list[int] = []
    table: list[bytes] = []
    copied: list[int] = []  # how many buffers were copied (into the pool, maybe)

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        with buffer.raw() as view:
            length = view.nbytes
            if length < threshold:
                return True
            found = descriptor(view, length)
            if found is None:
                copied.append(1)
            fd, offset, mode = found or (_copy(view), 0, PRIVATE)
        fds.append(fd)
        table.append(_ENTRY.pack(offset, length, mode))
        return False

    try:
        data = pickle.dumps(obj, 5, buffer_callback=out_of_band)
    except BaseException:
        _close(fds)
        raise
    finally:
        if copied and _pool.entries:
            _pool.trim()
    if not fds:
        return data, fds
    return b"".join([_HEAD.pack(0, len(fds)), *table, data]), fds


class _Big(Exception):
    """A buffer goes out of band: the pickler of small values gives up."""


def _in_band(threshold: int) -> Callable[[pickle.PickleBuffer], bool]:
    """The buffer callback that keeps buffers below ``threshold`` in band (cached)."""
    check = _in_band_checks.get(threshold)
    if check is None:

        def check(buffer: pickle.PickleBuffer) -> bool:
            with buffer.raw() as view:
                if view.nbytes >= threshold:
                    raise _Big
            return True

        if len(_in_band_checks) > 16:
            _in_band_checks.clear()
        _in_band_checks[threshold] = check
    return check


_in_band_checks: dict[int, Callable[[pickle.PickleBuffer], bool]] = {}


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
        reuse = _pool.active()
        for index in range(count):
            fd, fds[index] = fds[index], -1
            offset, length, mode = _ENTRY.unpack_from(payload, _HEAD.size + index * _ENTRY.size)
            buffers.append(map_received(fd, offset, length, mode, reuse))
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
    """A memfd holding a copy of ``view``: a reused one of the pool's, or a new sealed one."""
    with _pool.lock:
        fd = _pool.copy(view) if _pool.usable() else None
    if fd is not None:
        return fd
    fd = os.memfd_create("trio_fork buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write(fd, view)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _FROZEN)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(fd: int, view: memoryview) -> None:
    # write(), not a mapping: the kernel allocates the pages as it copies into them,
    # with no page fault and no zeroing of pages about to be overwritten.
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


class _Pool:
    """Memfds of big buffers sent from here, written again once nobody holds them.

    Most of the cost of copying a big buffer into a new memfd is not the copy but
    the allocation of its shared memory, page by page where the kernel gives shared
    memory no huge pages (each 4 KiB page charged, put in the page cache and on the
    LRU lists; then the same again to free it), and the receiver's unmapping that
    frees it. A program that sends arrays of the same size call after call pays it
    every time. So while this process is an RPC worker, or has workers of its own
    (:func:`enter` and :func:`leave`, around each), the memfds it sends are kept and
    written again: the copy is then one ``memcpy`` into pages that exist already.

    A memfd may be written again only when no process maps it or holds a descriptor
    of it any more, wherever it was sent on to. The kernel counts that: each sending
    opens a new read-only file of the memfd (receivers map it privately, as any
    other), and inotify reports when a file's last reference, descriptor or mapping,
    in any process, is gone (``IN_CLOSE_NOWRITE``). A lost event (queue overflow)
    makes the pool forget them all. Pooled memfds are sealed against shrinking and
    growing, not writing: the pool's is the only writable descriptor of them.

    Memory: idle memfds that the last two sendings of big buffers did not use are
    freed at the next one; the rest when the pool's users are gone (a worker's at
    its exit). At most ``_POOL_BYTES`` and ``_POOLED`` memfds, held or idle, are pooled.
    """

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()  # calls may be made from several threads
        self.users = 0  # the workers of this process, while it has some
        self.notify = -1  # the inotify descriptor, once there is a pool
        self.entries: dict[int, list[Any]] = {}  # watch -> [fd, size, view, holders, last]
        self.sendings = 0  # sendings of big buffers

    def active(self) -> bool:
        """Whether this process pools its buffers: if it has workers, or is one."""
        if self.users:
            return True
        rpc = sys.modules.get("trio_fork.worker._rpc")
        return rpc is not None and rpc.Worker.current is not None

    def usable(self) -> bool:
        """Whether this process pools its buffers, and can (called with the lock held)."""
        if not self.active():
            return False
        if self.notify == -1:
            self.notify = _inotify()
        return self.notify >= 0  # -2: no inotify to be had here

    def enter(self) -> None:
        """A worker of this process starts: pool while there are some."""
        with self.lock:
            self.users += 1

    def leave(self) -> None:
        """A worker of this process is gone: with the last one, the pool goes."""
        with self.lock:
            self.users -= 1
            if self.users:
                return
            kept.drop()  # the mappings kept of what workers sent us
            if self.notify >= 0:
                self.drop(list(self.entries))
                _close([self.notify])
                self.notify = -1

    def copy(self, view: memoryview) -> int | None:
        """A read-only descriptor of a pooled memfd holding ``view``; None if none."""
        self.released()
        length = len(view)
        found = None
        for watch, (_, size, _, holders, _) in self.entries.items():
            if not holders and length <= size <= 2 * length:
                if found is None or size < self.entries[found][1]:
                    found = watch
        if found is not None:
            entry = self.entries[found]
            if entry[2] is None:
                # Mapped once, populated: later copies take no page faults.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                entry[2] = memoryview(mmap.mmap(entry[0], entry[1], flags, **UNTRACKED))
            entry[2][:length] = view
        elif len(self.entries) >= _POOLED or self.size() + length > _POOL_BYTES:
            return None
        else:
            added = self.add(view)
            if added is None:
                return None
            found, entry = added
        reader = os.open(f"/proc/self/fd/{entry[0]}", os.O_RDONLY | os.O_CLOEXEC)
        entry[3] += 1
        entry[4] = self.sendings
        return reader

    def size(self) -> int:
        return sum(entry[1] for entry in self.entries.values())

    def add(self, view: memoryview) -> tuple[int, list[Any]] | None:
        """A new pooled memfd holding ``view``; None if it cannot be watched."""
        fd = os.memfd_create("trio_fork buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            watch = _watch(self.notify, fd)
        except OSError:  # ENOSPC: fs.inotify.max_user_watches
            os.close(fd)
            return None
        try:
            _write(fd, view)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FIXED)
        except BaseException:
            _unwatch(self.notify, watch)
            os.close(fd)
            raise
        entry = self.entries[watch] = [fd, len(view), None, 0, self.sendings]
        return watch, entry

    def released(self) -> None:
        """Count the files of pooled memfds closed since last asked."""
        while True:
            try:
                data = os.read(self.notify, 4096)
            except BlockingIOError:
                return
            for watch, mask, _, length in _EVENTS.iter_unpack(data[: len(data) // 16 * 16]):
                if mask & _IN_Q_OVERFLOW or length:
                    self.drop(list(self.entries))  # counts lost: nothing can be reused
                    return
                entry = self.entries.get(watch)
                if entry is not None and mask & _IN_CLOSE_NOWRITE:
                    entry[3] -= 1

    def trim(self) -> None:
        """After a sending of big buffers: free what the last two did not reuse."""
        with self.lock:
            self.sendings += 1
            stale = self.sendings - 2
            self.drop([w for w, e in self.entries.items() if not e[3] and e[4] < stale])

    def drop(self, watches: Iterable[int]) -> None:
        """Forget memfds: freed by the kernel once their readers are gone too."""
        for watch in watches:
            fd, _, view, _, _ = self.entries.pop(watch)
            _unwatch(self.notify, watch)
            if view is not None:
                region = view.obj
                view.release()
                region.close()
            os.close(fd)

    def forget(self) -> None:
        """In a new child: the pool is its parent's. Close its copies of the descriptors."""
        for fd, _, view, _, _ in self.entries.values():
            if view is not None:
                view.release()
            _close([fd])
        self.entries.clear()
        kept.drop()
        _close([self.notify])
        self.notify = -1
        self.users = 0
        self.lock = _thread.allocate_lock()  # another thread may have held it


def _inotify() -> int:
    """A new inotify descriptor; -2 if there can be none (EMFILE: 128 per user)."""
    try:
        import ctypes

        fd = ctypes.CDLL(None, use_errno=True).inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return -2
    return int(fd) if fd >= 0 else -2


def _watch(notify: int, fd: int) -> int:
    import ctypes

    path = f"/proc/self/fd/{fd}".encode()
    watch = ctypes.CDLL(None, use_errno=True).inotify_add_watch(notify, path, _IN_CLOSE_NOWRITE)
    if watch < 0:
        raise OSError(ctypes.get_errno(), "inotify_add_watch")
    return int(watch)


def _unwatch(notify: int, watch: int) -> None:
    import ctypes

    ctypes.CDLL(None).inotify_rm_watch(notify, watch)


_IN_CLOSE_NOWRITE = 0x10
_IN_Q_OVERFLOW = 0x4000
_EVENTS = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (of a name)
_POOLED = 16  # memfds at most in the pool, held or idle
_POOL_BYTES = 1 << 30  # and bytes at most: bigger buffers are copied into new memfds
_pool = _Pool()
os.register_at_fork(after_in_child=_pool.forget)
enter, leave = _pool.enter, _pool.leave


def _close(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
