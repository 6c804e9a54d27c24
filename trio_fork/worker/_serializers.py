"""How RPC arguments, results and events become bytes, on both sides of a worker's stream.

Standard library only. A serializer is any object with ``dumps(obj) -> bytes`` and
``loads(data) -> obj`` that can itself reach the worker: it travels there pickled, so
it must be picklable (an instance of a class defined at the top level of an
importable module), or be an importable module such as ``marshal`` or ``cloudpickle``.
"""

from __future__ import annotations

import pickle
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, final
else:

    def final(cls: type) -> type:
        return cls


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
        import json  # only in workers that use it

        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes, /) -> Any:
        import json

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
            if self.name not in sys.modules:
                __import__(self.name)
            self._module = sys.modules[self.name]
        return self._module

    def __reduce__(self) -> tuple[type[ModuleSerializer], tuple[str]]:
        return ModuleSerializer, (self.name,)

    def __repr__(self) -> str:
        return f"<serializer module {self.name}>"


PICKLE = PickleSerializer()
"""The default serializer: :mod:`pickle`."""

JSON = JSONSerializer()
"""A JSON serializer, for data that must stay data."""
