"""How RPC arguments, results and events become bytes, on both sides of a worker's stream.

Standard library only: this module is loaded into templates, and so into every
worker forked from them.

A serializer is any object with ``dumps(obj) -> bytes`` and ``loads(data) -> obj``
that can itself reach the worker: it travels there pickled, so it must be picklable
(an instance of a class defined at the top level of an importable module), or be an
importable module such as ``marshal`` or ``cloudpickle``.
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from typing import Any, Protocol, final, runtime_checkable


@runtime_checkable
class Serializer(Protocol):
    """What the ``serializer`` argument of :func:`open_rpc` and :func:`open_pool` needs."""

    def dumps(self, obj: Any, /) -> bytes:
        """Turn ``obj`` into bytes."""
        ...

    def loads(self, data: bytes, /) -> Any:
        """Turn bytes made by :meth:`dumps` (in either process) back into an object."""
        ...


@final
class PickleSerializer:
    """:mod:`pickle` at its highest protocol: any picklable object, by value.

    Functions and classes travel by reference (module and qualified name), so the
    worker must be able to import them.
    """

    def dumps(self, obj: Any, /) -> bytes:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes, /) -> Any:
        return pickle.loads(data)

    def __repr__(self) -> str:
        return "trio_fork.PICKLE"

    def __reduce__(self) -> str:
        return "PICKLE"


@final
class JSONSerializer:
    """Compact UTF-8 :mod:`json`: data only (tuples arrive as lists), never code."""

    def dumps(self, obj: Any, /) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes, /) -> Any:
        return json.loads(data)

    def __repr__(self) -> str:
        return "trio_fork.JSON"

    def __reduce__(self) -> str:
        return "JSON"


@final
class ModuleSerializer:
    """A module used as a serializer (its ``dumps`` and ``loads``), sent by name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._module: Any = None

    def dumps(self, obj: Any, /) -> bytes:
        return self._get().dumps(obj)  # type: ignore[no-any-return]

    def loads(self, data: bytes, /) -> Any:
        return self._get().loads(data)

    def _get(self) -> Any:
        if self._module is None:
            self._module = sys.modules.get(self.name) or importlib.import_module(self.name)
        return self._module

    def __reduce__(self) -> tuple[type[ModuleSerializer], tuple[str]]:
        return ModuleSerializer, (self.name,)

    def __repr__(self) -> str:
        return f"<serializer module {self.name}>"


PICKLE = PickleSerializer()
"""The default serializer: :mod:`pickle`."""

JSON = JSONSerializer()
"""A JSON serializer, for data that must stay data."""


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
    try:
        pickle.dumps(serializer, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"serializer: {serializer!r} cannot be sent to a worker: {exc} (it must be "
            "picklable, e.g. an instance of a class defined at the top level of a module)"
        ) from exc
    return serializer
