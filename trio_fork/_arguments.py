"""Checking what users pass, before anything is sent: names, targets, values, fds.

Every error here names the argument at fault, so that a bad call fails at the call,
in the caller's process, rather than as a remote error later.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from .worker._serializers import ModuleSerializer
from .worker._wire import close_all

T = TypeVar("T")


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileDescriptorLike = int | _HasFileno
"""A file descriptor, or an object with a ``fileno()`` method such as a file or socket."""


@runtime_checkable
class Serializer(Protocol):
    """What the ``serializer`` argument of :func:`open_rpc` and :func:`open_pool` needs."""

    def dumps(self, obj: Any, /) -> bytes:
        """Turn ``obj`` into bytes."""
        ...

    def loads(self, data: bytes, /) -> Any:
        """Turn bytes made by :meth:`dumps` (in either process) back into an object."""
        ...


def module_names(modules: Iterable[str], where: str) -> list[str]:
    """``modules`` as a list of module names, or a clear error."""
    if isinstance(modules, str):
        raise TypeError(f"{where}: expected module names, got the string {modules!r} (a 1-tuple?)")
    names = list(modules)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: module names are non-empty strings, not {name!r}")
    return names


def check_name(name: str, what: str) -> str:
    """``name`` as ``"package.module:qualname"``, else ValueError.

    A name without a module (``"doit"``, ``"Worker.run"``) is looked up in the
    ``__main__`` of the process that runs it, as Perl looks a name up in ``main``.
    """
    module_name, sep, qualname = name.partition(":")
    if not sep and all(part.isidentifier() for part in name.split(".")):
        return f"__main__:{name}"
    if not (sep and module_name and qualname):
        raise ValueError(
            f"{what} {name!r} is not of the form 'package.module:qualname' (or 'qualname', "
            "for one in __main__)"
        )
    return name


def target_name(target: object) -> str:
    """The ``"module:qualname"`` by which another process finds ``target``."""
    if isinstance(target, str):
        return check_name(target, "target")
    if not callable(target):
        raise TypeError(
            f"target must be a 'module:qualname' string or a callable, not {type(target).__name__}"
        )
    module: object = getattr(target, "__module__", None)
    qualname: object = getattr(target, "__qualname__", None)
    owner = getattr(target, "__self__", None)
    bound_to_instance = (
        owner is not None and not isinstance(owner, type) and type(owner) is not type(sys)
    )
    if (
        not isinstance(module, str)
        or not isinstance(qualname, str)
        or "<" in qualname
        or bound_to_instance
    ):
        raise TypeError(
            f"target {target!r} cannot be found by name in another process: pass a "
            "function defined at the top level of a module, or a 'module:qualname' string"
        )
    return f"{module}:{qualname}"


def check_reference(obj: object, what: str) -> str | Callable[..., Any]:
    """A function for a worker (``function``, ``init``...): a name, or a picklable callable."""
    if isinstance(obj, str):
        return check_name(obj, what)
    if not callable(obj):
        raise TypeError(
            f"{what} must be a 'module:qualname' string or a callable, not {type(obj).__name__}"
        )
    return _picklable(
        obj,
        f"{what} {obj!r} cannot be found by name in another process ({{}}): pass a function "
        "defined at the top level of a module, or a 'module:qualname' string",
    )


def pickle_arguments(value: object, where: str, args: tuple[object, ...] | list[object]) -> bytes:
    """``value`` pickled; if that fails, a TypeError naming the argument at fault."""
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for index, arg in enumerate(args):
            try:
                pickle.dumps(arg, pickle.HIGHEST_PROTOCOL)
            except Exception as arg_exc:
                raise TypeError(
                    f"{where}: argument {index} ({type(arg).__name__}) cannot be pickled: {arg_exc}"
                ) from arg_exc
        raise TypeError(f"{where}: cannot pickle the arguments: {exc}") from exc


def dup_fds(fds: Iterable[FileDescriptorLike], where: str) -> list[int]:
    """Duplicates of ``fds``, owned by the caller; a clear error for anything else."""
    if isinstance(fds, (int, str, bytes)) or hasattr(fds, "fileno"):
        raise TypeError(f"{where}: expected a sequence of descriptors, got {fds!r}")
    owned: list[int] = []
    try:
        for index, obj in enumerate(fds):
            owned.append(dup_fd(obj, where, index))
    except BaseException:
        close_all(owned)
        raise
    return owned


def dup_fd(obj: Any, where: str, index: int) -> int:
    """A duplicate of one descriptor (or ``fileno()``), close-on-exec."""
    if isinstance(obj, bool) or not (isinstance(obj, int) or hasattr(obj, "fileno")):
        raise TypeError(
            f"{where}: item {index} ({type(obj).__name__}) is neither a file descriptor "
            "nor an object with fileno()"
        )
    try:
        fd = obj if isinstance(obj, int) else obj.fileno()
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"fileno() returned {fd!r}")
        return os.dup(fd)
    except (OSError, ValueError, OverflowError) as exc:
        raise ValueError(f"{where}: item {index} ({obj!r}) is not an open file descriptor") from exc


def check_serializer(serializer: object) -> Serializer:
    """``serializer`` as something that can be sent to a worker, or a clear error."""
    if type(serializer) is type(sys):
        name = getattr(serializer, "__name__", None)
        methods = [getattr(serializer, method, None) for method in ("dumps", "loads")]
        if not all(callable(method) for method in methods) or not isinstance(name, str):
            raise TypeError(f"serializer: module {name!r} has no dumps() and loads()")
        return ModuleSerializer(name)
    if not isinstance(serializer, Serializer):
        raise TypeError(
            f"serializer: {serializer!r} has no dumps() and loads() (see trio_fork.Serializer)"
        )
    return _picklable(
        serializer,
        f"serializer: {serializer!r} cannot be sent to a worker: {{}} (it must be picklable, "
        "e.g. an instance of a class defined at the top level of a module)",
    )


def _picklable(obj: T, message: str) -> T:
    """``obj`` if it pickles; else a TypeError with ``message`` (``{}``: why not)."""
    try:
        pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(message.format(exc)) from exc
    return obj
