"""This program's main module in workers: when it is needed, and how it is loaded.

Functions and classes defined in ``__main__`` travel by reference, like everything
pickled. The first ``run_sync`` call that refers to one loads the main module into the
template, as :mod:`multiprocessing`'s forkserver does: under the name ``__mp_main__``,
so that its ``if __name__ == "__main__":`` block does not run.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from typing import TYPE_CHECKING, Any

from ._errors import RemoteError
from .worker._apply import adopt_main

if TYPE_CHECKING:
    from ._remote import RemoteTemplate
    from ._template import Template


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


def _main_location() -> tuple[str | None, str | None]:
    """How to load this process's main module elsewhere: by module name, or by path."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str):
        # ``python -m package`` runs package.__main__, whose code is all "main"
        # code: there is nothing to load without running the program again.
        if name == "__main__" or name.endswith(".__main__"):
            return None, None
        return name, None
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and os.path.basename(path) not in ("ipython", "ipython3"):
        return None, os.path.abspath(path)
    return None, None


async def load_main(template: Template | RemoteTemplate) -> None:
    name, path = _main_location()
    if name is None and path is None:
        raise TypeError(
            "this program's __main__ cannot be loaded in a worker (an interactive "
            "session, python -c, or a package's __main__): define the functions and "
            "classes you send to workers in a module"
        )
    try:
        await template._invoke(adopt_main, name, path)
    except RemoteError as exc:
        raise RemoteError(
            exc.type_name,
            f"loading the main module {name or path} into the worker template failed "
            f"(does its top-level code run the program? put that under "
            f"'if __name__ == \"__main__\":'): {exc.message}",
            exc.remote_traceback,
        ) from None
    # As multiprocessing does: what workers pickle from their __mp_main__ finds ours.
    sys.modules.setdefault("__mp_main__", sys.modules["__main__"])
