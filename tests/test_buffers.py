"""The out-of-band buffer machinery itself (trio_fork.worker._buffers), in one process.

Each test sends to itself: ``dumps`` makes the payload and descriptors a frame would
carry, ``receive`` maps them as the other side would. How the calls of workers use it
is tested in tests/test_large_data.py.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

import trio_fork
from trio_fork._shared import check_threshold
from trio_fork.worker import _buffers, _mappings

np = pytest.importorskip("numpy")

MIB = 1 << 20


def send(obj: object, threshold: int | None = MIB) -> object:
    """``obj`` through dumps and receive, as another process would get it."""
    payload, fds = _buffers.dumps(obj, threshold)
    return _buffers.loads(*_buffers.receive(payload, fds))


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def mappings() -> int:
    """Mappings of memfds in this process."""
    with open("/proc/self/maps") as file:
        return sum("/memfd:trio_fork" in line for line in file)


def test_small_objects_are_plain_pickles() -> None:
    value = {"a": [1, 2.0, "three"], "array": np.arange(10)}
    payload, fds = _buffers.dumps(value)
    assert fds == []
    assert payload == pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    assert _buffers.receive(payload, []) == (payload, [])


def test_a_big_array_goes_in_a_sealed_memfd_and_comes_back_on_a_private_mapping() -> None:
    array = np.arange(MIB // 8 * 3, dtype=np.float64)
    payload, fds = _buffers.dumps({"x": array, "small": np.ones(3)})
    assert len(fds) == 1
    assert len(payload) < 1000  # the data is not in the payload
    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE
    assert seals & fcntl.F_SEAL_SHRINK
    spare = os.dup(fds[0])
    try:
        data, buffers = _buffers.receive(payload, fds)
        received = _buffers.loads(data, buffers)["x"]
        del data, buffers
        assert np.array_equal(received, array)
        assert received.flags.writeable
        # Copy-on-write: what the receiver writes stays its own.
        received[:] = -1
        assert np.frombuffer(os.pread(spare, 16, 0), np.float64).tolist() == [0.0, 1.0]
    finally:
        os.close(spare)


def test_the_mapping_and_its_descriptor_go_with_the_last_object_on_them() -> None:
    before = mappings()
    received = send(np.ones(2 * MIB, dtype=np.uint8))
    assert mappings() == before + 1
    view = received[10:20]
    del received
    gc.collect()
    assert mappings() == before + 1  # the slice still holds it
    del view
    assert mappings() == before  # and the autouse check: no descriptor left


def test_a_received_array_is_sent_on_by_descriptor_until_it_is_written_to() -> None:
    received = send(np.ones(2 * MIB, dtype=np.uint8))
    _, fds = _buffers.dumps(received)
    _, again = _buffers.dumps(received[MIB:])  # a slice of it: the same memfd, too
    assert inode(fds[0]) == inode(again[0])
    _, fresh = _buffers.dumps(np.ones(2 * MIB, dtype=np.uint8))
    assert inode(fresh[0]) != inode(fds[0])
    received[5] = 7  # one page is now this process's own: send a copy
    _, copied = _buffers.dumps(received)
    assert inode(copied[0]) != inode(fds[0])
    for fd in [*fds, *again, *fresh, *copied]:
        os.close(fd)


def test_a_resent_slice_arrives_with_its_offset() -> None:
    received = send(np.arange(MIB, dtype=np.int64))
    part = send(received[12345:])
    assert part[0] == 12345
    assert len(part) == MIB - 12345


def test_a_shared_array_is_sent_without_a_copy_and_read_only_by_default() -> None:
    array = trio_fork.shared_array(MIB, np.uint8)
    array[:] = 3
    payload, fds = _buffers.dumps(array)
    assert os.fstat(fds[0]).st_size == MIB
    # A read-only descriptor: the receiver can only map it privately.
    assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    received = _buffers.loads(*_buffers.receive(payload, fds))
    assert received[0] == 3
    received[0] = 9
    assert array[0] == 3


def test_a_shared_array_with_shared_writes_is_written_in_place() -> None:
    array = trio_fork.shared_array((4, MIB // 4), np.uint8, shared_writes=True)
    received = send(array)
    received[1, 2] = 42
    assert array[1, 2] == 42


def test_shared_buffers_arrive_as_memoryviews() -> None:
    buffer = trio_fork.shared_buffer(2 * MIB)
    memoryview(buffer)[:3] = b"abc"
    received = send(buffer)
    assert isinstance(received, memoryview)
    assert bytes(received[:3]) == b"abc"


def test_pickle_buffers_go_out_of_band_and_bytes_stay_in_band() -> None:
    data = bytearray(b"x" * 2 * MIB)
    payload, fds = _buffers.dumps(pickle.PickleBuffer(data))
    assert len(fds) == 1
    received = _buffers.loads(*_buffers.receive(payload, fds))
    assert isinstance(received, memoryview)
    assert not received.readonly
    assert received == data
    # CPython's pickler offers no hook for bytes and bytearray: they stay in the pickle.
    for value in (bytes(data), data):
        payload, fds = _buffers.dumps(value)
        assert fds == []
        assert len(payload) > 2 * MIB
    readonly = send(pickle.PickleBuffer(bytes(data)))
    assert isinstance(readonly, memoryview)
    assert readonly.readonly


def test_the_threshold() -> None:
    array = np.ones(1000, dtype=np.uint8)
    fds = _buffers.dumps(array, 1000)[1]
    assert len(fds) == 1
    os.close(fds[0])
    assert _buffers.dumps(array, 1001)[1] == []
    assert _buffers.dumps(array, None) == (pickle.dumps(array, pickle.HIGHEST_PROTOCOL), [])


@pytest.mark.parametrize(
    ("threshold", "error"),
    [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError), ("1", TypeError)],
)
def test_bad_thresholds(threshold: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="open_rpc: buffer_threshold"):
        check_threshold(threshold, "open_rpc")  # type: ignore[arg-type]


def test_bad_shared_sizes() -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        trio_fork.shared_buffer(0)
    with pytest.raises(TypeError):
        trio_fork.shared_buffer(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds no bytes"):
        trio_fork.shared_array((0, 3))


def test_bad_tables_and_descriptors_are_refused_and_closed() -> None:
    payload, fds = _buffers.dumps(np.ones(MIB, dtype=np.uint8))
    with pytest.raises(ValueError, match="without their descriptors"):
        _buffers.receive(payload, [])
    with pytest.raises(ValueError, match="1 descriptors came with a table of 2"):
        _buffers.receive(payload.replace(b"\0\1", b"\0\2", 1), [os.dup(fds[0])])
    with pytest.raises(ValueError, match="cannot be mapped"):
        _buffers.receive(payload[:3], [os.dup(fds[0])])
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, MIB)
    with pytest.raises(ValueError, match="not a sealed memfd"):
        _buffers.receive(payload, [unsealed])
    small = os.memfd_create("small", os.MFD_ALLOW_SEALING)
    fcntl.fcntl(small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with pytest.raises(ValueError, match="not a sealed memfd"):
        _buffers.receive(payload, [small])
    with pytest.raises(ValueError, match="cannot be mapped"):
        _buffers.receive(payload, [os.open(os.devnull, os.O_RDONLY)])
    os.close(fds[0])
    # Each refused descriptor was closed: the autouse check finds none left.


def test_a_failed_pickle_leaves_no_descriptor() -> None:
    with pytest.raises((AttributeError, pickle.PicklingError)):
        _buffers.dumps([np.ones(MIB, dtype=np.uint8), lambda: None])


def test_nothing_in_dev_shm_and_no_tracker() -> None:
    before = set(os.listdir("/dev/shm"))
    kept = send(np.ones(4 * MIB, dtype=np.uint8))
    assert set(os.listdir("/dev/shm")) == before
    assert kept.sum() == 4 * MIB


def test_the_worker_side_module_imports_only_the_standard_library() -> None:
    code = (
        "import sys; import trio_fork.worker._buffers, trio_fork._shared; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'anyio', 'trio', 'attrs', 'sniffio')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def pooling() -> Iterator[None]:
    """This process pools its buffers, as it does while it has workers."""
    _buffers.enter()
    try:
        yield
    finally:
        _buffers.leave()


def test_memfds_are_reused_once_nobody_holds_them(pooling: None) -> None:
    payload, fds = _buffers.dumps(np.full(2 * MIB, 1, np.uint8))
    first = inode(fds[0])
    # Sent read-only, sealed against shrinking and growing (not writing: it is reused).
    assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & _buffers.FIXED == _buffers.FIXED
    held = _buffers.loads(*_buffers.receive(payload, fds))
    payload, fds = _buffers.dumps(np.full(2 * MIB, 2, np.uint8))
    assert inode(fds[0]) != first  # the first is held: a new one
    other = _buffers.loads(*_buffers.receive(payload, fds))
    assert int(held[0]) == 1
    assert int(other[0]) == 2
    del held
    payload, fds = _buffers.dumps(np.full(2 * MIB, 3, np.uint8))
    assert inode(fds[0]) == first  # let go of: written again
    again = _buffers.loads(*_buffers.receive(payload, fds))
    assert int(again[0]) == int(again[-1]) == 3
    assert int(other[0]) == int(other[-1]) == 2  # never written under its holder


def test_a_buffer_sent_on_keeps_its_memfd_held(pooling: None) -> None:
    payload, fds = _buffers.dumps(np.full(2 * MIB, 1, np.uint8))
    first = inode(fds[0])
    received = _buffers.loads(*_buffers.receive(payload, fds))
    _, sent_on = _buffers.dumps(received)  # by its descriptor: the same file
    del received
    for value in (2, 3):
        _, fds = _buffers.dumps(np.full(2 * MIB, value, np.uint8))
        assert inode(fds[0]) != first  # the descriptor sent on still holds it
        os.close(fds[0])
    assert np.frombuffer(os.pread(sent_on[0], 8, 0), np.uint8).tolist() == [1] * 8
    os.close(sent_on[0])
    _, fds = _buffers.dumps(np.full(2 * MIB, 4, np.uint8))
    assert inode(fds[0]) == first
    os.close(fds[0])


def test_a_clean_mapping_of_a_reused_memfd_is_kept_for_its_next_sending(pooling: None) -> None:
    payload, fds = _buffers.dumps(np.full(2 * MIB, 1, np.uint8))
    first = inode(fds[0])
    received = _buffers.loads(*_buffers.receive(payload, fds))
    address = received.__array_interface__["data"][0]
    assert _mappings.kept.idle == {}
    del received  # clean: kept, and the memfd let go of all the same
    assert list(_mappings.kept.idle) == [first]
    payload, fds = _buffers.dumps(np.full(2 * MIB, 2, np.uint8))
    assert inode(fds[0]) == first
    again = _buffers.loads(*_buffers.receive(payload, fds))
    assert _mappings.kept.idle == {}  # in use again
    assert again.__array_interface__["data"][0] == address
    assert int(again[0]) == int(again[-1]) == 2  # the new contents, through the old mapping
    # While it is used, the memfd is held: another sending goes elsewhere.
    _, fds = _buffers.dumps(np.full(2 * MIB, 3, np.uint8))
    assert inode(fds[0]) != first
    os.close(fds[0])
    assert int(again[0]) == 2
    del again
    _buffers.leave()  # the process stops pooling: what was kept goes
    assert _mappings.kept.idle == {}
    assert mappings() == 0
    _buffers.enter()


def test_a_mapping_written_to_is_never_kept(pooling: None) -> None:
    payload, fds = _buffers.dumps(np.full(2 * MIB, 1, np.uint8))
    received = _buffers.loads(*_buffers.receive(payload, fds))
    received[MIB] = 99  # a private copy of that page, which the memfd has not
    del received
    assert _mappings.kept.idle == {}
    again = send(np.full(2 * MIB, 2, np.uint8))
    assert set(again.tolist()) == {2}


def test_kept_mappings_go_when_unused_or_too_many(pooling: None) -> None:
    held = [send(np.full((index + 1) * MIB, index, np.uint8)) for index in range(3)]
    del held
    assert len(_mappings.kept.idle) == 3
    for _ in range(3):  # receipts that use none of them
        send(np.full(8 * MIB, 1, np.uint8))
    assert len(_mappings.kept.idle) == 1  # only the last 8 MiB one: the others went
    assert len(_buffers._pool.entries) == 1
    assert mappings() == 2  # of that one memfd: the pool's, and the one kept


def test_what_the_pool_does_not_reuse_is_freed(pooling: None) -> None:
    pool = _buffers._pool
    os.close(_buffers.dumps(np.ones(2 * MIB, np.uint8))[1][0])
    assert len(pool.entries) == 1
    os.close(_buffers.dumps(np.ones(8 * MIB, np.uint8))[1][0])
    assert len(pool.entries) == 2  # the 2 MiB one was used one sending ago
    os.close(_buffers.dumps(np.ones(8 * MIB, np.uint8))[1][0])
    assert [entry[1] for entry in pool.entries.values()] == [8 * MIB]  # two ago: freed
    _buffers.leave()
    assert pool.entries == {}
    assert mappings() == 0
    _buffers.enter()  # for the fixture, which leaves once more


def test_without_workers_nothing_is_pooled() -> None:
    fds = _buffers.dumps(np.ones(2 * MIB, np.uint8))[1]
    assert fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    assert _buffers._pool.entries == {}
    os.close(fds[0])


def test_a_forked_child_lets_go_of_its_parents_pool() -> None:
    # In a process of its own: this one has threads, and forks warn then.
    code = """if True:
        import os, numpy
        from trio_fork.worker import _buffers
        _buffers.enter()
        from trio_fork.worker import _mappings
        _buffers.loads(*_buffers.receive(*_buffers.dumps(numpy.ones(2 << 20, numpy.uint8))))
        assert len(_mappings.kept.idle) == 1
        fd = _buffers.dumps(numpy.ones(4 << 20, numpy.uint8))[1][0]
        pool = _buffers._pool
        assert len(pool.entries) == 2 and pool.notify >= 0
        pid = os.fork()
        if pid == 0:
            ok = pool.entries == {} and pool.notify == -1 and pool.users == 0
            ok = ok and _mappings.kept.idle == {}
            os._exit(0 if ok else 1)
        assert os.waitpid(pid, 0)[1] == 0
        assert len(pool.entries) == 2
        os.close(fd)
        _buffers.leave()
        assert pool.entries == {} and pool.notify == -1
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_threads_sending_at_once_never_share_a_memfd(pooling: None) -> None:
    seen: dict[int, list[tuple[int, int]]] = {1: [], 2: []}

    def send_many(value: int) -> None:
        for _ in range(30):
            received = send(np.full(2 * MIB, value, np.uint8))
            seen[value].append((int(received[0]), int(received[-1])))

    threads = [threading.Thread(target=send_many, args=(value,)) for value in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {value: [(value, value)] * 30 for value in seen}
