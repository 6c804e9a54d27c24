"""Bad input gets a clear error, and nothing is lost or left running."""

from __future__ import annotations

import os
import threading

import pytest

import trio_fork
from tests import targets

pytestmark = pytest.mark.anyio


@pytest.fixture
async def template() -> trio_fork.Template:  # type: ignore[misc]
    async with trio_fork.open_template(preload=["tests.targets"]) as template:
        yield template
        # After every bad call, the same template still works.
        async with template.spawn(targets.one_byte) as child:
            assert await child.stream.receive() == b"x"


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (42, TypeError, "not int"),
        (None, TypeError, "not NoneType"),
        ("not a name", ValueError, "module:qualname"),
        ("", ValueError, "module:qualname"),
        (":f", ValueError, "module:qualname"),
        (lambda sock: None, TypeError, "top level of a module"),
        (threading.Thread().start, TypeError, "top level of a module"),
    ],
)
async def test_bad_targets(
    template: trio_fork.Template, target: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        async with template.spawn(target):  # type: ignore[arg-type]
            pass


def _defined_in_main(sock: object) -> None:
    pass


_defined_in_main.__module__ = "__main__"


async def test_functions_of_our_main_are_refused(template: trio_fork.Template) -> None:
    with pytest.raises(TypeError, match="'__main__:_defined_in_main'"):
        async with template.spawn(_defined_in_main):
            pass


async def test_unpicklable_arguments(template: trio_fork.Template) -> None:
    with pytest.raises(TypeError, match=r"argument 1 \(lock\) cannot be pickled"):
        async with template.spawn(targets.nothing, 1, threading.Lock()):
            pass
    with pytest.raises(TypeError, match="argument 0"):
        await template.send_args(lambda: None)
    with pytest.raises(TypeError, match="argument 1"):
        await template.eval("pass", 1, threading.Lock())


async def test_bad_file_descriptors(template: trio_fork.Template) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        await template.send_fds(read_end)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        await template.send_fds(-1)
    closed = open(os.devnull)
    closed.close()
    with pytest.raises(ValueError, match="not an open file descriptor"):
        await template.send_fds(closed)
    with pytest.raises(TypeError, match="neither a file descriptor"):
        await template.send_fds("0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of descriptors"):
        async with template.spawn(targets.nothing, fds=0):  # type: ignore[arg-type]
            pass


async def test_bad_module_names(template: trio_fork.Template) -> None:
    with pytest.raises(TypeError, match="module names"):
        await template.require(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="1-tuple"):
        async with trio_fork.open_template(preload="json"):
            pass
    with pytest.raises(TypeError, match="code must be a str"):
        await template.eval(b"pass")  # type: ignore[arg-type]


async def test_missing_interpreter() -> None:
    with pytest.raises(FileNotFoundError, match="cannot start a template with python="):
        async with trio_fork.open_template(python="/no/such/python"):
            pass
    with pytest.raises(FileNotFoundError, match="cannot start a template"):
        async with trio_fork.open_template(cwd="/no/such/directory"):
            pass


async def test_an_interpreter_of_another_python_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trio_fork._process.PYTHON_VERSION", (3, 99))
    with pytest.raises(trio_fork.BrokenTemplateError, match=r"runs Python 3\.\d+ but"):
        async with trio_fork.open_template():
            pass


async def test_an_interpreter_that_is_not_python() -> None:
    with pytest.raises(trio_fork.BrokenTemplateError, match="before it was ready"):
        async with trio_fork.open_template(python="/bin/false"):
            pass
