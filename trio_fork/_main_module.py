"""This program's main module in workers: where it is, when it is loaded, and how.

Functions and classes defined in ``__main__`` travel by reference, like everything
pickled, so a worker needs the main module to find them. Each worker is told where it
is and takes it on as ``__mp_main__``, as :mod:`multiprocessing`'s workers do (so that
its ``if __name__ == "__main__":`` block does not run), but runs it only when first
used (see :func:`trio_fork.worker._apply.expect_main`). The first call that refers to
``__main__`` loads it into the template instead, once, so that every worker forked
afterwards has it without loading it again.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from typing import TYPE_CHECKING, Any

from ._errors import RemoteError
from .worker import _wire
from .worker._apply import adopt_main

if TYPE_CHECKING:
    from ._handle import TemplateHandle


class _MainFinder(pickle.Pickler):
    """Pickles to nowhere, noting whether anything refers to ``__main__``."""

    found = False

    def reducer_override(self, obj: Any) -> Any:
        if getattr(obj, "__module__", None) == "__main__":
            self.found = True
        return NotImplemented


def refers_to_main(objects: object) -> bool:
    finder = _MainFinder(io.BytesIO(), pickle.HIGHEST_PROTOCOL)
    finder.dump(objects)
    return finder.found


def main_location() -> tuple[str | None, str | None]:
    """How to load this process's main module elsewhere: by module name, or by path.

    ``(None, None)`` when it cannot be: an interactive session, ``python -c``, or a
    package's ``__main__`` (run by ``python -m package``), whose code is all "main"
    code, as :mod:`multiprocessing` has it.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str):
        if name == "__main__" or name.endswith(".__main__"):
            return None, None
        return name, None
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and os.path.basename(path) not in ("ipython", "ipython3"):
        return None, os.path.abspath(path)
    return None, None


def load_main(handle: TemplateHandle) -> None:
    """Load this program's main module into the handle's template; blocking.

    Raises:
        TypeError: The main module cannot be loaded elsewhere.
        RemoteError: Loading it failed in the template.
    """
    from ._handle import _request_sync

    name, path = main_location()
    if name is None and path is None:
        raise TypeError(
            "this program's __main__ cannot be loaded in a worker (an interactive "
            "session, python -c, or a package's __main__): define the functions and "
            "classes you send to workers in a module"
        )
    payload = pickle.dumps((adopt_main, (name, path)), pickle.HIGHEST_PROTOCOL)
    try:
        # The handle's own channel: it carries nothing else once the handle serves forks.
        _request_sync(handle._channel, _wire.FrameReader(), _wire.INVOKE, payload)
    except RemoteError as exc:
        raise RemoteError(
            exc.type_name,
            f"loading the main module {name or path} into the worker template failed "
            f"(does its top-level code run the program? put that under "
            f"'if __name__ == \"__main__\":'): {exc.message}",
            exc.remote_traceback,
        ) from None
