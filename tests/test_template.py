"""Templates: starting them, and the commands that prepare them."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import trio_fork
from tests import targets
from tests.helpers import parent_side_modules, receive
from trio_fork import _open

pytestmark = pytest.mark.anyio


async def environment(template: trio_fork.Template) -> dict[str, object]:
    async with template.spawn(targets.report_environment) as child:
        result: dict[str, object] = await receive(child.stream)
    return result


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "default"])
async def test_template_is_a_child_that_imports_only_the_standard_library(fresh: bool) -> None:
    async with trio_fork.open_template(fresh=fresh) as template:
        with open(f"/proc/{template.pid}/stat") as file:
            ppid = int(file.read().rsplit(")", 1)[1].split()[1])
        # A fresh interpreter is ours; otherwise a fork of the default template.
        default = _open._default.handle
        assert ppid == (os.getpid() if fresh else default and default.pid)
        env = await environment(template)
    modules = set(env["modules"])  # type: ignore[arg-type]
    for heavy in ("trio", "anyio", "attrs", "sniffio"):
        assert heavy not in modules
    # The package's __init__ loads its public names lazily: nothing of the parent side.
    assert parent_side_modules(modules) == []
    assert "trio_fork.worker._template" in modules


async def test_template_gets_our_sys_path_and_devnull_stdin() -> None:
    async with trio_fork.open_template() as template:
        env = await environment(template)
    assert env["stdin"] == "/dev/null"
    ours = [os.path.abspath(entry) for entry in sys.path]
    assert env["path"] == ours


async def test_env_and_cwd_act_as_in_subprocess(tmp_path: os.PathLike[str]) -> None:
    environ = {**os.environ, "TRIO_FORK_TEST": "yes"}
    async with trio_fork.open_template(env=environ, cwd=tmp_path) as template:
        env = await environment(template)
    assert env["env"]["TRIO_FORK_TEST"] == "yes"  # type: ignore[index]
    assert env["cwd"] == os.fspath(tmp_path)


async def test_preload_and_require_import_modules(tmp_path: os.PathLike[str]) -> None:
    module = os.path.join(tmp_path, "trio_fork_test_module.py")
    with open(module, "w") as file:
        file.write("VALUE = 42\n")
    sys.path.insert(0, os.fspath(tmp_path))
    try:
        async with trio_fork.open_template(preload=["json"]) as template:
            await template.require("trio_fork_test_module", "decimal")
            env = await environment(template)
    finally:
        sys.path.remove(os.fspath(tmp_path))
    assert {"json", "decimal", "trio_fork_test_module"} <= set(env["modules"])  # type: ignore[call-overload]


async def test_failing_preload_raises_remote_error() -> None:
    with pytest.raises(trio_fork.RemoteError) as info:
        async with trio_fork.open_template(preload=["json", "no_such_module_anywhere"]):
            pytest.fail("the template should not open")
    assert info.value.type_name == "ModuleNotFoundError"
    assert "no_such_module_anywhere" in info.value.message


async def test_require_failure_is_a_remote_error_and_the_template_keeps_working() -> None:
    async with trio_fork.open_template() as template:
        with pytest.raises(trio_fork.RemoteError) as info:
            await template.require("no_such_module_anywhere")
        error = info.value
        assert error.type_name == "ModuleNotFoundError"
        assert "no_such_module_anywhere" in str(error)
        assert "Remote traceback" in str(error)
        assert "No module named 'no_such_module_anywhere'" in error.remote_traceback
        await template.require("json")


async def test_a_module_failing_on_import_shows_where(tmp_path: os.PathLike[str]) -> None:
    with open(os.path.join(tmp_path, "trio_fork_fails_on_import.py"), "w") as file:
        file.write("SETTING = 1\nraise RuntimeError('bad configuration')\n")
    sys.path.insert(0, os.fspath(tmp_path))
    try:
        async with trio_fork.open_template() as template:
            with pytest.raises(trio_fork.RemoteError) as info:
                await template.require("trio_fork_fails_on_import")
    finally:
        sys.path.remove(os.fspath(tmp_path))
    assert info.value.type_name == "RuntimeError"
    assert 'trio_fork_fails_on_import.py", line 2' in info.value.remote_traceback
    assert "trio_fork/worker/" not in info.value.remote_traceback


async def test_eval_runs_in_main_with_args_bound() -> None:
    async with trio_fork.open_template() as template:
        await template.eval("X = int(args[0]) + 1", "41")
        await template.eval("Y = args", 1, b"two", {"three": 3})
        await template.eval("HAS_ARGS = 'args' in globals()")
        env = await environment(template)
    assert env["main"] == {"X": 42, "Y": [1, b"two", {"three": 3}], "HAS_ARGS": True}
    assert env["main_has_args"] is False


async def test_eval_error_carries_the_remote_traceback_with_source() -> None:
    code = textwrap.dedent(
        """
        def broken():
            return 1 / 0
        broken()
        """
    )
    async with trio_fork.open_template() as template:
        with pytest.raises(trio_fork.RemoteError) as info:
            await template.eval(code)
        assert info.value.type_name == "ZeroDivisionError"
        assert "return 1 / 0" in info.value.remote_traceback
        # It starts at the user's code, not in trio_fork's serve loop.
        assert "trio_fork/worker/" not in info.value.remote_traceback
        with pytest.raises(trio_fork.RemoteError) as syntax:
            await template.eval("def (")
        assert syntax.value.type_name == "SyntaxError"
        await template.eval("Z = 1")


async def test_queued_args_and_fds_reach_children_in_order(tmp_path: os.PathLike[str]) -> None:
    first = open(os.path.join(tmp_path, "first"), "wb")
    second = open(os.path.join(tmp_path, "second"), "wb")
    with first, second:
        async with trio_fork.open_template() as template:
            await template.send_args("a")
            await template.send_fds(first)
            await template.send_args(b"b", {"k": 1})
            async with template.spawn(targets.report_args, "c", fds=[second.fileno()]) as child:
                reported = await receive(child.stream)
        assert not first.closed
        assert not second.closed
        assert reported == [
            "a",
            ("fd", targets.fd_identity(first.fileno())),
            b"b",
            {"k": 1},
            "c",
            ("fd", targets.fd_identity(second.fileno())),
        ]


async def test_fork_inherits_and_is_independent() -> None:
    async with trio_fork.open_template() as template:
        await template.require("json")
        await template.eval("X = 1")
        await template.send_args("queued")
        async with template.fork() as forked:
            assert forked.pid != template.pid
            await forked.eval("X += 1")
            await forked.send_args("forked only")
            await forked.require("decimal")
            async with forked.spawn(targets.report_args) as child:
                assert await receive(child.stream) == ["queued", "forked only"]
            forked_env = await environment(forked)
            async with forked.fork() as grandchild:
                grand_env = await environment(grandchild)
        env = await environment(template)
        async with template.spawn(targets.report_args) as child:
            assert await receive(child.stream) == ["queued"]
    assert forked_env["main"] == {"X": 2}
    assert grand_env["main"] == {"X": 2}
    assert env["main"] == {"X": 1}
    assert "decimal" in forked_env["modules"]  # type: ignore[operator]
    assert "json" in forked_env["modules"]  # type: ignore[operator]
    assert forked_env["ppid"] != os.getpid()


async def test_using_a_closed_template_raises() -> None:
    async with trio_fork.open_template() as template:
        pass
    anyio = pytest.importorskip("anyio")
    with pytest.raises(anyio.ClosedResourceError):
        await template.require("json")
    with pytest.raises(anyio.ClosedResourceError):
        async with template.spawn(targets.nothing):
            pass
