"""trio_fork: fast, structured worker processes forked from template processes.

A template is a small Python process that has already imported what your workers
need. Forking it is much faster than starting an interpreter, and safe, because no
event loop or thread ever runs in it.
"""

from __future__ import annotations

from ._child import Child as Child
from ._errors import BrokenTemplateError as BrokenTemplateError
from ._errors import BrokenWorkerError as BrokenWorkerError
from ._errors import RemoteError as RemoteError
from ._handle import TemplateHandle as TemplateHandle
from ._handle import fork_main_template as fork_main_template
from ._handle import start_early as start_early
from ._handle import start_template as start_template
from ._handle import stop_early as stop_early
from ._handover import adopt_template as adopt_template
from ._pool import Pool as Pool
from ._pool import PoolStatistics as PoolStatistics
from ._pool import open_pool as open_pool
from ._rpc import RPC as RPC
from ._rpc import Call as Call
from ._rpc import open_rpc as open_rpc
from ._run_sync import WorkerContext as WorkerContext
from ._run_sync import WorkerContextStatistics as WorkerContextStatistics
from ._run_sync import configure_default_context as configure_default_context
from ._run_sync import current_default_worker_limiter as current_default_worker_limiter
from ._run_sync import default_context_statistics as default_context_statistics
from ._run_sync import open_worker_context as open_worker_context
from ._run_sync import run_sync as run_sync
from ._serializers import JSON as JSON
from ._serializers import PICKLE as PICKLE
from ._serializers import Serializer as Serializer
from ._template import FileDescriptorLike as FileDescriptorLike
from ._template import Template as Template
from ._template import open_template as open_template

__version__ = "0.1.0.dev0"
