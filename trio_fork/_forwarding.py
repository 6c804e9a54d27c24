"""Import forwarding: the parent's pure-Python modules, for a host that lacks them.

A remote template's processes ask (through the relay) for modules they cannot find
on their own host; the answer is the source of the module as this process would
import it from its ``sys.path``: found without importing anything here, never a
module of the standard library (the remote has its own, of its own version), and
never compiled code, which may not run there.
"""

from __future__ import annotations

import marshal
import os
import sysconfig
from importlib.machinery import PathFinder, SourceFileLoader

_STDLIB = tuple(
    os.path.join(os.path.realpath(sysconfig.get_paths()[key]), "")
    for key in ("stdlib", "platstdlib")
)
_INSTALLED = tuple(
    os.path.join(os.path.realpath(sysconfig.get_paths()[key]), "") for key in ("purelib", "platlib")
)


def module_source(name: str) -> tuple[bool, str, str] | None:
    """``(is_package, source, filename)`` of module ``name``, or None if not served."""
    parts = name.split(".")
    path: list[str] | None = None
    spec = None
    for index in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[: index + 1]), path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
        if path is None and index < len(parts) - 1:
            return None
    if spec is None or not isinstance(spec.loader, SourceFileLoader) or not spec.origin:
        return None
    origin = os.path.realpath(spec.origin)
    if origin.startswith(_STDLIB) and not origin.startswith(_INSTALLED):
        return None
    try:
        source = spec.loader.get_source(name)
    except (ImportError, OSError):
        return None
    if source is None:
        return None
    return spec.submodule_search_locations is not None, source, spec.origin


def answer(name: str) -> bytes:
    """The payload of the relay's MODULE frame for ``name``."""
    return marshal.dumps(module_source(name))
