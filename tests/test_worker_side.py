"""The worker side: standard library only, startable from its sources, one transport."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import trio_fork
import trio_fork.worker
from tests.helpers import receive
from trio_fork import _open
from trio_fork.worker import _wire

pytestmark = pytest.mark.anyio

_WORKER_DIR = os.path.dirname(trio_fork.worker.__file__)
_ROOT = os.path.dirname(os.path.dirname(_WORKER_DIR))

GREET = """
def greet(sock, name):
    import sys
    sock.sendall(repr((name, sorted(m for m in sys.modules if m.startswith("trio_fork")))).encode())

def double(x):
    return 2 * x
"""


def test_every_worker_module_imports_in_an_isolated_interpreter_without_third_parties() -> None:
    modules = sorted(
        "trio_fork.worker" + ("" if name == "__init__.py" else "." + name[:-3])
        for name in os.listdir(_WORKER_DIR)
        if name.endswith(".py")
    )
    script = textwrap.dedent(
        f"""
        import importlib, sys
        sys.path.insert(0, {_ROOT!r})
        for name in {modules!r}:
            importlib.import_module(name)
        heavy = [m for m in sys.modules if m.split(".")[0] in ("trio", "anyio", "attrs", "sniffio")]
        parent = [m for m in sys.modules if m.startswith("trio_fork._")]
        print(heavy, parent)
        """
    )
    # -I -S: no site-packages, so importing a third-party module would fail outright.
    output = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[] []"


async def test_a_template_starts_from_its_sources_where_trio_fork_is_not_installed() -> None:
    async with _open._started(sys.executable, None, None, how="sources", isolated=True) as template:
        await template.eval(GREET)
        # Nothing outside the standard library is importable there.
        with pytest.raises(trio_fork.RemoteError, match="No module named 'anyio'"):
            await template.eval("import anyio")
        async with template.spawn("__main__:greet", "world") as child:
            data = b"".join([chunk async for chunk in child.stream])
        name, modules = eval(data)
        assert name == "world"
        assert all(m == "trio_fork" or m.startswith("trio_fork.worker") for m in modules)
        assert child.returncode == 0
        async with trio_fork.open_rpc(template, "__main__:double") as rpc:
            assert await rpc.call(21) == 42
        with pytest.raises(trio_fork.RemoteError) as info:
            await template.eval("def broken():\n    raise ValueError('shown')\nbroken()")
        # Tracebacks show the source of eval'd code there too.
        assert "raise ValueError('shown')" in info.value.remote_traceback


async def test_a_channel_without_descriptors_refuses_them_at_the_call() -> None:
    async with _open._started(sys.executable, None, None, how="pipes") as template:
        await template.eval("X = 1")
        await template.require("json")
        await template.send_args("queued")
        with pytest.raises(TypeError, match="cannot carry file descriptors"):
            await template.send_fds(0)
        with pytest.raises(TypeError, match="cannot carry file descriptors"):
            async with template.spawn("__main__:X"):
                pass
        with pytest.raises(TypeError, match="cannot carry file descriptors"):
            async with template.fork():
                pass
        # The channel is still in step after the refusals.
        with pytest.raises(trio_fork.RemoteError, match="NameError"):
            await template.eval("undefined_name")


@pytest.mark.parametrize(
    "cls",
    ["Template", "Child", "TemplateHandle", "RPC", "Pool", "Call", "WorkerContext"],
)
def test_public_classes_have_no_public_constructor(cls: str) -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        getattr(trio_fork, cls)()


def test_the_package_loads_its_public_names_lazily() -> None:
    script = "import sys, trio_fork; print('anyio' in sys.modules, 'trio' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert output.split() == ["False", "False"]
    assert "open_template" in dir(trio_fork)
    assert not hasattr(trio_fork, "annotations")
    with pytest.raises(AttributeError, match="no_such_name"):
        trio_fork.no_such_name  # type: ignore[attr-defined]  # noqa: B018


async def test_code_in_a_template_takes_its_queue(tmp_path: os.PathLike[str]) -> None:
    assert not trio_fork.worker.in_template()
    with pytest.raises(RuntimeError, match="only be called in a template"):
        trio_fork.worker.take_queue()
    read_end, write_end = os.pipe()
    try:
        async with trio_fork.open_template() as template:
            await template.send_args("kept", 2)
            await template.send_fds(write_end)
            await template.eval(
                "import os, trio_fork.worker\n"
                "assert trio_fork.worker.in_template()\n"
                "TAKEN = trio_fork.worker.take_queue()\n"
                "os.write(TAKEN[2], repr(TAKEN[:2]).encode())\n"
                "os.close(TAKEN[2])\n"
            )
            async with template.spawn("tests.targets:report_args", "own") as child:
                reported = await receive(child.stream)
        os.close(write_end)
        write_end = -1
        assert os.read(read_end, 100) == b"['kept', 2]"
        assert reported == ["own"]  # the queue was empty when the child was forked
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_header_that_lies_about_its_length_allocates_nothing_it_did_not_get() -> None:
    import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(_wire.HEADER.pack(_wire.RESULT, 0, 1, 1 << 60) + b"x" * 1000)
        reader = _wire.FrameReader()
        for _ in range(3):
            ours.setblocking(False)
            try:
                reader.receive(ours)
            except BlockingIOError:
                pass
            assert reader.next_frame() is None
        assert len(reader._buffer) <= 2 * _wire.RECEIVE_SIZE
        assert reader.in_frame


def test_frames_with_many_descriptors_keep_each_its_own() -> None:
    # Over the kernel's 253 per message, and two frames back to back.
    import socket

    ours, theirs = socket.socketpair()
    fds = [os.dup(0) for _ in range(300)]
    try:
        with ours, theirs:
            for count in (300, 5):
                _wire.send_blocking(theirs, _wire.encode(_wire.FDS, count, b"", fds[:count]))
                fds[:count] = [os.dup(0) for _ in range(count)]
            reader = _wire.FrameReader()
            frames: list[_wire.Frame] = []
            while len(frames) < 2:
                reader.receive(ours)
                while (frame := reader.next_frame()) is not None:
                    frames.append(frame)
            assert [(f.id, len(f.fds), f.fds_lost) for f in frames] == [
                (300, 300, False),
                (5, 5, False),
            ]
            for frame in frames:
                _wire.close_all(frame.fds)
    finally:
        _wire.close_all(fds)
