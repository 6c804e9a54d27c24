"""trio_fork: fast, structured worker processes forked from template processes.

A template is a small Python process that has already imported what your workers
need. Forking it is much faster than starting an interpreter, and safe, because no
event loop or thread ever runs in it.

The public names are loaded on first use: the worker side (:mod:`trio_fork.worker`),
which runs in templates, imports this package without importing trio or anyio.
"""

# Not typing's: importing typing here would load it (and re) into every template.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._arguments import FileDescriptorLike as FileDescriptorLike
    from ._arguments import Serializer as Serializer
    from ._call import Call as Call
    from ._child import Child as Child
    from ._errors import BrokenTemplateError as BrokenTemplateError
    from ._errors import BrokenWorkerError as BrokenWorkerError
    from ._errors import RemoteError as RemoteError
    from ._exec import TemplateProcess as TemplateProcess
    from ._handle import TemplateHandle as TemplateHandle
    from ._handle import fork_main_template as fork_main_template
    from ._handle import start_template as start_template
    from ._handover import adopt_template as adopt_template
    from ._open import open_template as open_template
    from ._open import start_early as start_early
    from ._open import stop_early as stop_early
    from ._pool import Pool as Pool
    from ._pool import PoolStatistics as PoolStatistics
    from ._pool import open_pool as open_pool
    from ._remote import RemoteTemplate as RemoteTemplate
    from ._remote import open_remote_template as open_remote_template
    from ._rpc import RPC as RPC
    from ._rpc import open_rpc as open_rpc
    from ._run_sync import WorkerContext as WorkerContext
    from ._run_sync import WorkerContextStatistics as WorkerContextStatistics
    from ._run_sync import WorkerType as WorkerType
    from ._run_sync import cache_scope as cache_scope
    from ._run_sync import configure_default_context as configure_default_context
    from ._run_sync import current_default_worker_limiter as current_default_worker_limiter
    from ._run_sync import default_context_statistics as default_context_statistics
    from ._run_sync import open_worker_context as open_worker_context
    from ._run_sync import run_sync as run_sync
    from ._template import Template as Template
    from .worker._serializers import JSON as JSON
    from .worker._serializers import PICKLE as PICKLE

__version__ = "0.1.0.dev0"

# Public name -> the private module that defines it.
_LOCATIONS = {
    "FileDescriptorLike": "_arguments",
    "Serializer": "_arguments",
    "Call": "_call",
    "Child": "_child",
    "BrokenTemplateError": "_errors",
    "BrokenWorkerError": "_errors",
    "RemoteError": "_errors",
    "TemplateHandle": "_handle",
    "fork_main_template": "_handle",
    "start_template": "_handle",
    "adopt_template": "_handover",
    "open_template": "_open",
    "start_early": "_open",
    "stop_early": "_open",
    "Pool": "_pool",
    "PoolStatistics": "_pool",
    "open_pool": "_pool",
    "RemoteTemplate": "_remote",
    "open_remote_template": "_remote",
    "RPC": "_rpc",
    "open_rpc": "_rpc",
    "WorkerContext": "_run_sync",
    "WorkerContextStatistics": "_run_sync",
    "WorkerType": "_run_sync",
    "cache_scope": "_run_sync",
    "configure_default_context": "_run_sync",
    "current_default_worker_limiter": "_run_sync",
    "default_context_statistics": "_run_sync",
    "open_worker_context": "_run_sync",
    "run_sync": "_run_sync",
    "Template": "_template",
    "TemplateProcess": "_exec",
    "JSON": "worker._serializers",
    "PICKLE": "worker._serializers",
}

__all__ = sorted(_LOCATIONS)


def __getattr__(name: str) -> "Any":
    module_name = _LOCATIONS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trio_fork' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"trio_fork.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LOCATIONS])
