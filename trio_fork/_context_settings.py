"""A worker context's configuration: trio_parallel's arguments, checked as it checks them.

The arguments of ``open_worker_context``, ``cache_scope`` and
``configure_default_context`` (trio_parallel's, positional or keyword, with its
errors), and ``preload``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import attrs

from ._arguments import check_reference, module_names
from .worker._apply import Pickled, apply
from .worker._rpc import WorkerSpec

DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_GRACE_PERIOD = 30.0


class WorkerType(enum.StrEnum):
    """How ``trio_parallel`` starts its workers; accepted for compatibility.

    trio_fork forks every worker from a template: a fresh interpreter that imported
    ``preload`` and serves forks, which is what ``multiprocessing``'s forkserver is.
    Each worker starts as a clean process with this program's ``sys.path``,
    directory, environment and ``multiprocessing`` key, and its main module as
    ``__mp_main__``, whichever type is asked for: the value is checked and kept
    (:attr:`WorkerContext.worker_type`), and changes nothing else.
    """

    SPAWN = "spawn"
    FORKSERVER = "forkserver"
    FORK = "fork"


@attrs.frozen
class Settings:
    """A context's configuration, checked: what trio_parallel takes, and ``preload``."""

    idle_timeout: float
    init: Callable[[], object] | str | None
    retire_calls: int | None
    retire: Callable[[], object] | str | None
    grace_period: float
    worker_type: WorkerType
    preload: tuple[str, ...]
    # What they were given as, for the context's read-only attributes.
    given_init: object = None
    given_retire: object = None

    def spec(self) -> WorkerSpec:
        return WorkerSpec(apply, self.init, (), Pickled, False, True, None, self.retire)


def make_settings(
    idle_timeout: float,
    init: object,
    retire: object,
    grace_period: float,
    worker_type: object,
    preload: Iterable[str],
) -> Settings:
    """Check a context's arguments, with trio_parallel's errors (and ours for ``preload``)."""
    modules = tuple(module_names(preload, "preload"))
    _seconds("idle_timeout", idle_timeout)
    _seconds("grace_period", grace_period)
    try:
        kind = WorkerType(worker_type)  # type: ignore[arg-type]  # checked here
    except ValueError:
        choices = ", ".join(repr(member.value) for member in WorkerType)
        raise ValueError(f"worker_type must be one of {choices}, not {worker_type!r}") from None
    function_init = None if init is bool else _function("init", init)
    calls: int | None = None
    function_retire: Callable[[], object] | str | None = None
    if isinstance(retire, int) and not isinstance(retire, bool):
        if retire < 1:
            raise ValueError(f"retire must be at least 1 call, not {retire}")
        calls = retire
    elif retire is not bool:
        function_retire = _function("retire", retire)
    return Settings(
        float(idle_timeout),
        function_init,
        calls,
        function_retire,
        float(grace_period),
        kind,
        modules,
        init,
        retire,
    )


def _seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be non-negative, was {value!r}")


def _function(name: str, value: object) -> Callable[[], object] | str:
    if not (callable(value) or isinstance(value, str)):
        raise TypeError(
            f"{name} must be callable (or a 'module:qualname' string), not {value!r} "
            f"(a {type(value).__name__})"
        )
    return check_reference(value, name)
