"""What a ``run_sync`` call sends: its function, pickled once, and its arguments."""

from __future__ import annotations

import functools
import inspect
import pickle
import types
from collections.abc import Callable
from typing import Any


def request_payload(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The call's payload: its function, pickled once, and its arguments.

    Raises:
        TypeError: ``fn`` is not callable, or is asynchronous.
        pickle.PicklingError: ``fn`` or an argument cannot be pickled (what pickle
            raised is its cause).
    """
    function = _pickled_functions.get(fn) if type(fn) in _BY_REFERENCE else None
    if function is None:
        function = _pickle_function(fn)
    try:
        # pickle itself rather than PICKLE.dumps(): this is every call's path.
        return pickle.dumps((function, *args), pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for index, arg in enumerate(args):
            try:
                pickle.dumps(arg, pickle.HIGHEST_PROTOCOL)
            except Exception as arg_exc:
                raise pickle.PicklingError(
                    f"run_sync: argument {index} ({type(arg).__name__}) cannot be pickled: "
                    f"{arg_exc}"
                ) from arg_exc
        raise pickle.PicklingError(f"run_sync: the arguments cannot be pickled: {exc}") from exc


# Plain functions and built-ins (those that pickle by reference, and live as long as
# their module) are pickled once; other callables, such as partials, every time.
_BY_REFERENCE = (types.FunctionType, types.BuiltinFunctionType)
_pickled_functions: dict[Callable[..., Any], bytes] = {}
_MAX_PICKLED_FUNCTIONS = 256


def _pickle_function(fn: Callable[..., Any]) -> bytes:
    if not callable(fn):
        raise TypeError(f"run_sync: fn must be callable, not {type(fn).__name__}")
    if _is_async(fn):
        raise TypeError(
            f"run_sync runs sync functions, but {fn!r} is asynchronous: call it with an "
            "event loop of its own, or use open_rpc"
        )
    try:
        pickled = pickle.dumps(fn, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise pickle.PicklingError(
            f"run_sync: {fn!r} cannot be sent to a worker ({exc}): pass a function "
            "defined at the top level of a module"
        ) from exc
    if type(fn) in _BY_REFERENCE:
        if len(_pickled_functions) >= _MAX_PICKLED_FUNCTIONS:
            _pickled_functions.clear()
        _pickled_functions[fn] = pickled
    return pickled


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn)
