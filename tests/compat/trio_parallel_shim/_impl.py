"""``trio_parallel._impl``: trio-parallel's public functions, as trio_fork's.

trio-parallel's tests import its public names from here, and two private ones, which
map to trio_fork's nearest public equivalents:

- ``get_default_context()``: only its ``statistics()`` is used, which is
  ``trio_fork.default_context_statistics()``;
- ``DEFAULT_CONTEXT._worker_cache.shutdown(grace_period)``, with which the
  ``shutdown_cache`` fixture ends the default context's workers after a test:
  ``configure_default_context()`` (see :class:`_WorkerCache`).

A public name that trio_fork lacks raises :exc:`AttributeError` where a test uses it,
so that only the tests that need it fail.
"""

from __future__ import annotations

import warnings
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
        """End the default context's workers, as the ``shutdown_cache`` fixture asks.

        Through trio_fork's public interface: configuring the default context anew
        replaces it, so the next test starts without workers, as after trio-parallel's
        shutdown. The warning that a context with workers was replaced is what this
        call means to do, so it is not shown (the tests run with warnings as errors).
        """
        del grace_period
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trio_fork.configure_default_context()


class _DefaultContext:
    _worker_cache = _WorkerCache()

    def statistics(self) -> Any:
        return trio_fork.default_context_statistics()


DEFAULT_CONTEXT = _DefaultContext()


def get_default_context() -> _DefaultContext:
    return DEFAULT_CONTEXT
