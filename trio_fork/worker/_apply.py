"""What ``run_sync`` workers run, and how they take on the parent's ``__main__``.

A run_sync worker belongs to no event loop of the parent, so it is not a child
spawned over a template's channel (whose exit that channel reports): it is a template
forked on request from a ``TemplateHandle`` (which reports its exit on a pipe), turned
into an RPC worker by :func:`become_worker`. Each call comes with its function,
pickled once by the parent and unpickled once per worker; :func:`apply` pickles the
result itself, so that one that cannot be pickled fails the call with a
:exc:`pickle.PicklingError`, as trio-parallel and anyio raise it.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import _thread
import os
import pickle
import sys
from types import CoroutineType, ModuleType  # pickle imports types

from . import _buffers, _child, _rpc, _template

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

# Functions that came pickled with calls, by their pickle: a worker called with the
# same function again and again unpickles it once.
_functions: dict[bytes, Callable[..., Any]] = {}
_MAX_FUNCTIONS = 256


def apply(function: bytes, *args: Any) -> bytes | _buffers.Dumped:
    """Call the function that came with the call; its result, pickled here.

    Raises:
        TypeError: The function is asynchronous (it returned a coroutine, which is
            closed unawaited): ``run_sync`` runs sync functions.
        RuntimeError: The function could not be unpickled here.
        pickle.PicklingError: Its result cannot be pickled.
        Exception: What the function raised.
    """
    found = _functions.get(function)
    if found is None:
        try:
            _rpc.loading.call = _thread.get_ident()
            found = pickle.loads(function)
        except Exception as exc:
            raise RuntimeError(
                f"the worker could not load the function to call: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _rpc.loading.call = 0
        if len(_functions) >= _MAX_FUNCTIONS:
            _functions.clear()
        _functions[function] = found
    result = found(*args)
    if type(result) is CoroutineType:
        result.close()
        raise TypeError(
            f"run_sync runs sync functions, but {found!r} returned a coroutine (it is "
            "asynchronous): call it with an event loop of its own, or use open_rpc"
        )
    worker = _rpc.Worker.current
    try:
        payload, fds = _buffers.dumps(result, None if worker is None else worker.buffers)
    except Exception as exc:
        raise pickle.PicklingError(
            f"the result of {found!r} cannot be pickled: {type(exc).__name__}: {exc}"
        ) from exc
    # Its buffers' descriptors ride with the reply (see _rpc's dump).
    return _buffers.Dumped((payload, fds)) if fds else payload


class Pickled:
    """run_sync's serializer: arguments are pickled, results come from :func:`apply`
    already pickled (as bytes: anything else, an event, is pickled here)."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        if type(value) is bytes:
            return value
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes) -> Any:
        return pickle.loads(data)


def become_worker(
    spec: _rpc.WorkerSpec,
    setup: tuple[list[str], str, dict[str, str]] | None,
    authkey: bytes | None,
    main: tuple[str | None, str | None],
) -> NoReturn:
    """Turn this template, forked for one worker, into that worker; exit when it is done.

    INVOKEd as the fork's first command: its channel becomes the worker's socket.
    ``setup``: for :func:`~._template.align`, if the parent's ``sys.path``, directory
    or environment changed since the template started; ``authkey``: the parent's
    :mod:`multiprocessing` key (for manager proxies); ``main``: the parent's main
    module (see :func:`expect_main`). An error before the worker serves is the
    INVOKE's error: the parent then closes the channel, and this template shuts down.
    """
    server = _template.Server.current
    assert server is not None
    sock = server.channel.sock
    assert sock is not None
    # A worker dies with the template that made it, as a spawned child does.
    _child.prctl(_child.PR_SET_PDEATHSIG, _signal.SIGKILL)
    if setup is not None:
        _template.align(*setup)
    if authkey is not None:
        from multiprocessing import process

        process.current_process().authkey = authkey
    expect_main(*main)
    server.state.restore()
    _template.Server.current = None  # a worker, no longer a template
    code = 0
    try:
        _rpc.serve(sock, spec)
    except BaseException as exc:
        _child.print_exception(exc, None)
        code = 1
    _child.exit(code)


def adopt_main(spec_name: str | None, path: str | None) -> None:
    """Load the parent's main module as ``__mp_main__`` and make it ``__main__``.

    As :mod:`multiprocessing`'s forkserver does: what the parent pickles by reference
    to ``__main__`` resolves here and in every worker forked from here, and the
    module's ``if __name__ == "__main__":`` block does not run.
    """
    module = ModuleType("__mp_main__")
    previous = sys.modules["__main__"]
    # Registered before running, so that the module can refer to itself while it
    # loads (dataclasses look their module up in sys.modules, for instance).
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    try:
        _run_main(module, spec_name, path)
    except BaseException:
        sys.modules["__main__"] = previous
        del sys.modules["__mp_main__"]
        raise


def expect_main(spec_name: str | None, path: str | None) -> None:
    """Make the parent's main module this worker's ``__main__``, run when first used.

    Both peers run it in every worker, as ``__mp_main__``; trio_fork only when
    something needs it (unpickling a reference to it, reading one of its names), so
    that a main module with side effects costs nothing in workers that never use it.
    Nothing to do if the template loaded it already (:func:`adopt_main`), or if it
    cannot be loaded here (``python -c``, or a file that does not exist).
    """
    location = (spec_name, path)
    if getattr(sys.modules.get("__main__"), "__trio_fork_main__", None) == location:
        return
    if spec_name is None and not (path is not None and os.path.isfile(path)):
        return
    module = _LazyMain("__mp_main__")
    if path is not None:
        module.__file__ = path
    module.__trio_fork_main__ = location  # type: ignore[attr-defined]
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


class _LazyMain(ModuleType):
    """A main module that runs its code the first time one of its names is looked up."""

    def __getattr__(self, name: str) -> Any:
        # Only names the module lacks come here. Probes for special names (by pickle,
        # by inspect...) must not run the program's code.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module '__main__' has no attribute {name!r}")
        self.__class__ = ModuleType  # type: ignore[assignment]
        spec_name, path = self.__dict__["__trio_fork_main__"]
        try:
            _run_main(self, spec_name, path)
        except Exception as exc:
            raise RuntimeError(
                f"loading the main module {spec_name or path} in the worker failed ("
                f"{type(exc).__name__}: {exc}): does its top-level code run the program? "
                "Put that under 'if __name__ == \"__main__\":'"
            ) from exc
        return getattr(self, name)


def _run_main(module: Any, spec_name: str | None, path: str | None) -> None:
    if spec_name is not None:
        import importlib.util

        spec = importlib.util.find_spec(spec_name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            raise ImportError(f"cannot find the main module {spec_name!r}")
        code = spec.loader.get_code(spec_name)
        if code is None:
            raise ImportError(f"the main module {spec_name!r} has no code")
        filename = spec.origin
    else:
        assert path is not None
        with open(path, "rb") as file:
            code = compile(file.read(), path, "exec")
        filename = path
    module.__file__ = filename
    module.__trio_fork_main__ = (spec_name, path)
    _rpc.loading.main = True
    try:
        exec(code, module.__dict__)
    finally:
        _rpc.loading.main = False
