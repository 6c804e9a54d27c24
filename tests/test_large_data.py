"""Big arguments, results and events through shared memory, on every path that calls.

Each test checks where the data lands in the receiving process (on a memfd mapping,
or on its heap: tests.buffer_functions.where) and that nothing is left behind: the
autouse check counts descriptors, and :func:`memfds` counts the mappings and
descriptors of memfds that this process holds.
"""

from __future__ import annotations

import functools
import gc
import os
import pathlib
import pickle
import re
import subprocess
import sys
from typing import Any

import anyio
import pytest

import trio_fork
from tests import buffer_functions as f
from tests.sshd import SshTarget
from tests.test_remote import remote
from trio_fork import _open
from trio_fork._rpc import worker_spec
from trio_fork.worker import _buffers

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.anyio

MIB = 1 << 20
PRELOAD = ["numpy", "tests.buffer_functions"]


def memfds() -> tuple[int, int]:
    """Mappings and descriptors of trio_fork's memfds in this process."""
    with open("/proc/self/maps") as file:
        mapped = sum("/memfd:trio_fork" in line for line in file)
    held = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:trio_fork")
        except OSError:
            pass
    return mapped, held


@pytest.fixture
def baseline() -> object:
    before = memfds()
    yield
    gc.collect()  # what a test's tracebacks still hold in reference cycles
    assert memfds() == before, "memfds left mapped or open"


@pytest.fixture
async def template() -> object:
    async with trio_fork.open_template(preload=PRELOAD) as template:
        yield template


async def test_run_sync_arguments_and_results(baseline: None) -> None:
    array = np.arange(2 * MIB, dtype=np.uint8)
    async with trio_fork.open_worker_context(preload=PRELOAD) as context:
        total, place, writable = await context.run_sync(f.inspect, array, True)
        assert total == float(array.sum())
        assert place is not None  # on a memfd mapping in the worker
        assert writable
        assert array[0] == 0  # the worker wrote to its own copy
        result = await context.run_sync(f.make, 3 * MIB)
        assert f.where(result) is not None  # on a mapping here, not copied out of it
        assert int(result.sum()) == 7 * 3 * MIB
        doubled = await context.run_sync(f.double, array)
        assert np.array_equal(doubled, array * 2)
        del result, doubled


async def test_small_arrays_and_the_threshold(baseline: None) -> None:
    async with trio_fork.open_worker_context(preload=PRELOAD, buffer_threshold=4 * MIB) as context:
        _, place, _ = await context.run_sync(f.inspect, np.ones(2 * MIB, np.uint8))
        assert place is None  # below the threshold: in the pickle
        _, place, _ = await context.run_sync(f.inspect, np.ones(4 * MIB, np.uint8))
        assert place is not None
    async with trio_fork.open_worker_context(preload=PRELOAD, buffer_threshold=None) as context:
        _, place, _ = await context.run_sync(f.inspect, np.ones(8 * MIB, np.uint8))
        assert place is None
        assert f.where(await context.run_sync(f.make, 8 * MIB)) is None


async def test_rpc_both_ways_and_events(template: trio_fork.Template, baseline: None) -> None:
    async with trio_fork.open_rpc(template, f.double) as rpc:
        array = np.full(2 * MIB, 3, np.uint8)
        result = await rpc.call(array)
        assert f.where(result) is not None
        assert int(result[0]) == 6
    async with trio_fork.open_rpc(template, f.emit_arrays, events=True) as rpc:
        async with rpc.open_call(3, 2 * MIB) as call:
            events = [event async for event in call]
            assert await call.result() == 3
        assert [int(event[0]) for event in events] == [0, 1, 2]
        assert all(f.where(event) is not None for event in events)
        del events
        # Events nobody takes are unmapped with their call.
        assert await rpc.call(2, 2 * MIB) == 2
        async with rpc.open_call(2, 2 * MIB) as call:
            assert await call.result() == 2


async def test_events_outside_calls(template: trio_fork.Template, baseline: None) -> None:
    async with trio_fork.open_rpc(template, f.emit_outside) as rpc:
        assert await rpc.call(2 * MIB) == 2 * MIB
        with anyio.fail_after(10):
            event = await anext(aiter(rpc.events()))
        assert f.where(event) is not None
        assert int(event[-1]) == 4
        del event


async def test_more_buffers_than_one_message_carries(
    template: trio_fork.Template, baseline: None
) -> None:
    # 260 descriptors: over the 253 that one sendmsg carries, in both directions.
    arrays = [np.full(4096, index % 256, np.uint8) for index in range(260)]
    async with trio_fork.open_rpc(template, f.count_mapped, buffer_threshold=4096) as rpc:
        assert await rpc.call(arrays) == (260, 260)
    async with trio_fork.open_rpc(template, f.many, buffer_threshold=4096) as rpc:
        results = await rpc.call(260, 4096)
        assert [int(result[0]) for result in results] == [index % 256 for index in range(260)]
        assert all(f.where(result) is not None for result in results)
        del results


async def test_an_async_worker(template: trio_fork.Template, baseline: None) -> None:
    async with trio_fork.open_rpc(template, f.async_double) as rpc:
        results: list[object] = []
        async with anyio.create_task_group() as group:
            for value in range(4):
                group.start_soon(_append, results, rpc.call(np.full(MIB, value, np.uint8)))
        assert sorted(int(result[0]) for result in results) == [0, 2, 4, 6]  # type: ignore[index]
        results.clear()


async def test_pool_calls(template: trio_fork.Template, baseline: None) -> None:
    async with trio_fork.open_pool(template, f.inspect, max=2) as pool:
        arrays = [np.full(MIB, value, np.uint8) for value in range(4)]
        outcomes: list[object] = []
        async with anyio.create_task_group() as group:
            for array in arrays:
                group.start_soon(_append, outcomes, pool.call(array))
        assert sorted(total for total, _, _ in outcomes) == [value * MIB for value in range(4)]  # type: ignore[misc]
        assert all(place is not None for _, place, _ in outcomes)  # type: ignore[misc]


async def _append(results: list[object], call: object) -> None:
    results.append(await call)  # type: ignore[misc]


async def test_a_received_array_is_sent_on_by_its_descriptor(
    template: trio_fork.Template, baseline: None
) -> None:
    async with trio_fork.open_rpc(template, f.make) as maker:
        array = await maker.call(2 * MIB)
    here = f.where(array)
    assert here is not None
    async with trio_fork.open_rpc(template, f.inspect) as rpc:
        _, there, _ = await rpc.call(array)
        assert there == here  # the same memfd: sent on with no copy
        array[0] = 1  # now this process's own page: sent as a copy
        _, there, _ = await rpc.call(array)
        assert there is not None
        assert there[1] != here[1]
    del array


async def test_shared_arrays_go_without_a_copy_and_are_private_by_default(
    template: trio_fork.Template, baseline: None
) -> None:
    shared = trio_fork.shared_array(2 * MIB, np.uint8)
    shared[...] = 2
    async with trio_fork.open_rpc(template, f.inspect) as rpc:
        total, there, _ = await rpc.call(shared, True)
        assert total == 2.0 * 2 * MIB
        assert there == f.where(shared)
        assert int(shared[0]) == 2  # the worker wrote to its own copy
    writable = trio_fork.shared_array((2, MIB), np.uint8, shared_writes=True)
    async with trio_fork.open_rpc(template, f.fill) as rpc:
        await rpc.call(writable[1], 9)
    assert int(writable[0, 0]) == 0
    assert int(writable[1, 0]) == 9
    async with trio_fork.open_rpc(template, f.shared_result) as rpc:
        result = await rpc.call(2 * MIB)
        assert int(result[0]) == 5
        assert f.where(result) is not None
    del shared, writable, result


async def test_spawn_and_send_args(template: trio_fork.Template, baseline: None) -> None:
    async with template.fork() as forked:
        await forked.send_args(np.full(2 * MIB, 1, np.uint8), "small")
        async with forked.spawn(f.report_arrays, np.full(3 * MIB, 2, np.uint8)) as child:
            data = b""
            while chunk := await _receive(child):
                data += chunk
        queued, small, given = pickle.loads(data)
        assert queued[0] == 2.0 * MIB
        assert queued[1] is not None
        assert small == "small"
        assert given[0] == 2.0 * 3 * MIB
        assert given[1] is not None
        assert child.returncode == 0


async def _receive(child: trio_fork.Child) -> bytes:
    try:
        return await child.stream.receive()
    except anyio.EndOfStream:
        return b""


async def test_a_channel_without_descriptors_falls_back_to_the_pickle() -> None:
    async with _open._started(sys.executable, None, None, how="pipes") as template:
        await template.send_args(pickle.PickleBuffer(bytearray(2 * MIB)))
        await template.eval(
            "from trio_fork.worker import take_queue\n"
            "(value,) = take_queue()\n"
            "assert type(value) is bytearray and len(value) == 2 << 20, type(value)\n"
            "assert not any('memfd:' in line for line in open('/proc/self/maps'))\n"
        )


async def test_remote_templates_fall_back_to_the_pickle(
    ssh_target: SshTarget, baseline: None
) -> None:
    """A remote worker's socket is bridged over ssh: no descriptor can reach it."""
    big = pickle.PickleBuffer(bytearray(2 * MIB))
    async with remote(ssh_target) as far, trio_fork.open_template() as near:
        async with trio_fork.open_rpc(far, "tests.rpc_functions:length") as rpc:
            assert await rpc.call(big) == 2 * MIB
        # A pool across both: one way of sending for all its workers, the pickle.
        async with trio_fork.open_pool(
            [(near, 1), (far, 1)], "tests.rpc_functions:length", idle=2
        ) as pool:
            for _ in range(4):
                assert await pool.call(big) == 2 * MIB


async def test_other_serializers_are_unaffected(template: trio_fork.Template) -> None:
    spec = worker_spec(
        f.identity,
        init=None,
        init_args=(),
        serializer=trio_fork.JSON,
        events=False,
        exceptions=False,
        buffers=MIB,
    )
    assert spec.buffers is None
    async with trio_fork.open_rpc(template, f.identity, serializer=trio_fork.JSON) as rpc:
        assert await rpc.call(list(range(300_000))) == list(range(300_000))


async def test_bad_thresholds_fail_at_the_call(template: trio_fork.Template) -> None:
    with pytest.raises(ValueError, match="open_rpc: buffer_threshold must be at least 1"):
        async with trio_fork.open_rpc(template, f.identity, buffer_threshold=0):
            pass
    with pytest.raises(TypeError, match="open_pool: buffer_threshold must be a number"):
        async with trio_fork.open_pool(template, f.identity, buffer_threshold=1.0):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match=r"^buffer_threshold must be a number of bytes"):
        async with trio_fork.open_worker_context(buffer_threshold="big"):  # type: ignore[arg-type]
            pass


async def test_reused_memfds_never_change_what_a_process_holds(baseline: None) -> None:
    """Memfds of big arguments and results are written again only once let go of."""
    async with trio_fork.open_worker_context(preload=PRELOAD) as context:
        places = [await context.run_sync(f.keep, np.full(4 * MIB, v, np.uint8)) for v in range(4)]
        assert len(set(places)) == 4  # each held by the worker: a memfd each
        assert await context.run_sync(f.kept) == [(v, v) for v in range(4)]
        place = await context.run_sync(f.keep, np.full(4 * MIB, 9, np.uint8))
        assert place in places  # let go of: written again
        assert await context.run_sync(f.kept) == [(9, 9)]
        results = [await context.run_sync(f.make, 4 * MIB, value) for value in range(4)]
        assert len({f.where(result) for result in results}) == 4
        first = f.where(results.pop(0))
        again = await context.run_sync(f.make, 4 * MIB, 5)
        assert f.where(again) == first
        assert [(int(r[0]), int(r[-1])) for r in [*results, again]] == [
            (1, 1),
            (2, 2),
            (3, 3),
            (5, 5),
        ]
        del results, again


async def test_a_worker_reads_a_reused_memfd_on_the_mapping_it_kept(baseline: None) -> None:
    """No page fault for the same memfd sent again: the worker's page table still maps it."""
    size = 16 * MIB
    async with trio_fork.open_worker_context(preload=PRELOAD) as context:
        # The first call's argument was sent before there was a worker (and so a pool).
        await context.run_sync(f.faults_reading, np.full(size, 0, np.uint8))
        cold, first = await context.run_sync(f.faults_reading, np.full(size, 1, np.uint8))
        warm, second = await context.run_sync(f.faults_reading, np.full(size, 2, np.uint8))
        assert (first, second) == (1, 2)
        assert cold > size // (256 * 1024)  # one per 64 KiB at most (the kernel's fault-around)
        assert warm < cold // 10
        # Written to by the worker, the mapping is not kept: the next argument is whole.
        total, _, _ = await context.run_sync(f.inspect, np.full(size, 3, np.uint8), True)
        assert total == 3 * size
        total, _, _ = await context.run_sync(f.inspect, np.full(size, 4, np.uint8))
        assert total == 4 * size
        again, fourth = await context.run_sync(f.faults_reading, np.full(size, 5, np.uint8))
        assert fourth == 5
        assert again < cold // 10


async def test_a_worker_lets_go_of_the_arguments_before_it_answers(
    template: trio_fork.Template, baseline: None
) -> None:
    """When the answer comes the argument's memfd is free again: the next one goes in it.

    Letting go of it takes half a second here: answered first, the next argument
    would find it held and go in a new memfd.
    """
    async with trio_fork.open_worker_context(preload=PRELOAD) as context:
        await context.run_sync(f.identity, 0)  # a worker, and so a pool
        first = await context.run_sync(f.let_go_slowly, np.full(4 * MIB, 1, np.uint8))
        _, second, _ = await context.run_sync(f.inspect, np.full(4 * MIB, 2, np.uint8))
        assert first is not None
        assert second == first
    # An asynchronous worker, whose calls run in tasks of their own.
    async with trio_fork.open_rpc(template, f.let_go_slowly_async) as rpc:
        first = await rpc.call(np.full(4 * MIB, 1, np.uint8))
        assert first is not None
        assert await rpc.call(np.full(4 * MIB, 2, np.uint8)) == first


async def test_rpc_workers_reuse_memfds_too(template: trio_fork.Template, baseline: None) -> None:
    async with trio_fork.open_rpc(template, f.keep) as rpc:
        held = await rpc.call(np.full(4 * MIB, 1, np.uint8))
        assert await rpc.call(np.full(4 * MIB, 2, np.uint8)) != held
    async with trio_fork.open_pool(template, f.inspect, max=1) as pool:
        await pool.call(np.ones(8, np.uint8))  # a worker: made on demand, after the call
        _, first, _ = await pool.call(np.full(4 * MIB, 1, np.uint8))
        total, second, _ = await pool.call(np.full(4 * MIB, 2, np.uint8))
        assert total == 2 * 4 * MIB
        # Answered, the first call's argument was let go of: the third goes in its memfd.
        total, third, _ = await pool.call(np.full(4 * MIB, 3, np.uint8))
        assert total == 3 * 4 * MIB
        assert first in (second, third)


async def test_cancelled_calls_leak_nothing(template: trio_fork.Template, baseline: None) -> None:
    async with trio_fork.open_pool(template, f.inspect, max=1, load=4) as pool:
        for kill in (False, True):
            with anyio.move_on_after(0.01):
                async with anyio.create_task_group() as group:
                    for _ in range(6):
                        call = functools.partial(pool.call, kill_on_cancel=kill)
                        group.start_soon(call, np.ones(8 * MIB, np.uint8))
            # The pool still works, and what was cancelled is gone.
            total, _, _ = await pool.call(np.ones(MIB, np.uint8))
            assert total == MIB


async def test_a_worker_dying_mid_transfer_leaks_nothing(
    template: trio_fork.Template, baseline: None
) -> None:
    async with trio_fork.open_pool(template, f.die_holding, max=1, load=3) as pool:
        for _ in range(3):
            with pytest.raises(trio_fork.BrokenWorkerError):
                await pool.call(np.ones(4 * MIB, np.uint8))
    async with trio_fork.open_rpc(template, f.die_after_emitting, events=True) as rpc:
        with pytest.raises(trio_fork.BrokenWorkerError):
            async with rpc.open_call(4 * MIB) as call:
                await call.result()


async def test_run_sync_cancelled_or_dead_leaks_nothing(baseline: None) -> None:
    async with trio_fork.open_worker_context(preload=PRELOAD) as context:
        array = np.ones(8 * MIB, np.uint8)
        with anyio.move_on_after(0.2):
            await context.run_sync(f.hold, array, 30.0, kill_on_cancel=True)
        with pytest.raises(trio_fork.BrokenWorkerError):
            await context.run_sync(f.die_holding, array)
        with anyio.move_on_after(0.2):
            await context.run_sync(f.make, 64 * MIB, kill_on_cancel=True)
        assert await context.run_sync(f.hold, array, 0.0) == 1.0


@pytest.mark.parametrize("calls", [40, pytest.param(1000, marks=pytest.mark.soak)])
async def test_many_big_calls_come_back_to_the_baseline(
    template: trio_fork.Template, baseline: None, calls: int
) -> None:
    """64 MiB each way, with cancellations and worker deaths mixed in."""
    size = 64 * MIB
    rss_before = _shmem()
    array = np.ones(size, np.uint8)
    async with (
        trio_fork.open_pool(template, f.double, max=2) as pool,
        trio_fork.open_worker_context(preload=PRELOAD) as context,
    ):
        for index in range(calls):
            # Half through a pool, half through run_sync; some cancelled on the way.
            call: Any = pool.call
            if index % 2:
                call = functools.partial(context.run_sync, f.double)
            if index % 10 in (4, 5):
                with anyio.move_on_after(0.001):
                    await call(array, kill_on_cancel=True)
                continue
            result = await call(array)
            assert int(result[-1]) == 2
            del result
    assert _shmem() <= rss_before + 4 * MIB


def _shmem() -> int:
    """Shared memory resident in this process (RssShmem), in bytes."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


def test_buffers_module_is_what_the_worker_side_uses() -> None:
    assert trio_fork.DEFAULT_BUFFER_THRESHOLD == _buffers.THRESHOLD == MIB


def test_the_example_of_the_docs(tmp_path: pathlib.Path) -> None:
    page = (pathlib.Path(__file__).parent.parent / "docs" / "large-data.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.DOTALL)
    assert code is not None
    (tmp_path / "example.py").write_text(code[1])
    out = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert out[1] == "(4096, 4096) 1.0"
    assert out[0] == out[2]
    assert float(out[0]) > 0.99
