"""What ``run_sync`` workers run, and how a template takes on the parent's ``__main__``."""

from __future__ import annotations

import pickle
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Functions that came pickled with calls, by their pickle: a worker called with the
# same function again and again unpickles it once.
_functions: dict[bytes, Callable[..., Any]] = {}
_MAX_FUNCTIONS = 256


def apply(function: bytes, *args: Any) -> Any:
    """Call the function that came with the call: pickled once by the parent,
    unpickled once per worker."""
    found = _functions.get(function)
    if found is None:
        try:
            found = pickle.loads(function)
        except Exception as exc:
            raise RuntimeError(
                f"the worker could not load the function to call: {type(exc).__name__}: {exc}"
            ) from exc
        if len(_functions) >= _MAX_FUNCTIONS:
            _functions.clear()
        _functions[function] = found
    return found(*args)


class _Loading:
    main = False  # this process is loading the parent's main module (see adopt_main)


loading = _Loading()


def adopt_main(spec_name: str | None, path: str | None) -> None:
    """Load the parent's main module as ``__mp_main__`` and make it ``__main__``.

    As :mod:`multiprocessing`'s forkserver does: what the parent pickles by reference
    to ``__main__`` resolves here and in every worker forked from here, and the
    module's ``if __name__ == "__main__":`` block does not run.
    """
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
    module = type(sys)("__mp_main__")
    module.__file__ = filename
    previous = sys.modules["__main__"]
    # Registered before running, so that the module can refer to itself while it
    # loads (dataclasses look their module up in sys.modules, for instance).
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    loading.main = True
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules["__main__"] = previous
        del sys.modules["__mp_main__"]
        raise
    finally:
        loading.main = False
