"""How RPC arguments, results and events become bytes, in the parent and the worker.

A serializer travels to the worker pickled: an instance of a class defined at the
top level of a module, or an importable module with ``dumps`` and ``loads``.
"""

from __future__ import annotations

import pickle
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Named:
    name = ""

    def __repr__(self) -> str:
        return f"trio_fork.{self.name}"

    def __reduce__(self) -> str:
        return self.name


class PickleSerializer(_Named):
    """:mod:`pickle` at its highest protocol; functions and classes go by name."""

    name = "PICKLE"

    def dumps(self, obj: Any, /) -> bytes:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes, /) -> Any:
        return pickle.loads(data)


class JSONSerializer(_Named):
    """Compact UTF-8 :mod:`json`: data only (tuples arrive as lists), never code."""

    name = "JSON"

    def dumps(self, obj: Any, /) -> bytes:
        import json  # only in the workers that use it

        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes, /) -> Any:
        import json

        return json.loads(data)


class ModuleSerializer:
    """A module used as a serializer (its ``dumps`` and ``loads``), sent by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def dumps(self, obj: Any, /) -> bytes:
        return self._module().dumps(obj)  # type: ignore[no-any-return]

    def loads(self, data: bytes, /) -> Any:
        return self._module().loads(data)

    def _module(self) -> Any:
        if self.name not in sys.modules:
            __import__(self.name)
        return sys.modules[self.name]

    def __reduce__(self) -> tuple[type[ModuleSerializer], tuple[str]]:
        return ModuleSerializer, (self.name,)

    def __repr__(self) -> str:
        return f"<serializer module {self.name}>"


PICKLE = PickleSerializer()
"""The default serializer: :mod:`pickle`."""

JSON = JSONSerializer()
"""A JSON serializer, for data that must stay data."""
