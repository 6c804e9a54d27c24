"""``trio_parallel._impl``: trio-parallel's public functions, as trio_fork's.

trio-parallel's tests import its public names from here, and two private ones, which
map to trio_fork's nearest public equivalents:

- ``get_default_context()``: only its ``statistics()`` is used, which is
  ``trio_fork.default_context_statistics()``;
- ``DEFAULT_CONTEXT._worker_cache.shutdown(grace_period)``: the ``shutdown_cache``
  fixture ends the default context's workers after a test; see :class:`_WorkerCache`.

A public name that trio_fork lacks raises :exc:`AttributeError` where a test uses it,
so that only the tests that need it fail.
"""

from __future__ import annotations

from typing import Any

import trio_fork

_PUBLIC = (
    "run_sync",
    "open_worker_context",
    "cache_scope",
    "WorkerContext",
    "WorkerType",
    "current_default_worker_limiter",
    "configure_default_context",
    "default_context_statistics",
)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        try:
            return getattr(trio_fork, name)
        except AttributeError:
            raise AttributeError(f"trio_fork has no {name} (trio_parallel.{name})") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _WorkerCache:
    def shutdown(self, grace_period: float) -> None:
        # trio_fork's default context belongs to one event loop run and ends with it,
        # so after a test there is nothing left to shut down. Were it process-wide, as
        # trio-parallel's is, its workers would have to be ended here.
        del grace_period


class _DefaultContext:
    _worker_cache = _WorkerCache()

    def statistics(self) -> Any:
        return trio_fork.default_context_statistics()


DEFAULT_CONTEXT = _DefaultContext()


def get_default_context() -> _DefaultContext:
    return DEFAULT_CONTEXT
