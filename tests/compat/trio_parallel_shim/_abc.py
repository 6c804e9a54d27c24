"""``trio_parallel._abc``: the error, as trio_fork's, and the worker interfaces.

``AbstractWorker`` and ``WorkerCache`` are trio-parallel's internal interfaces for its
worker processes. ``test_impl.py`` subclasses them at import time to build mock
workers; they are here only so that the module imports and its other tests run (the
tests that use the mocks check trio-parallel's internals, see docs/rpc.md).
"""

from __future__ import annotations

import abc
import collections
from typing import Any

from trio_fork import BrokenWorkerError as BrokenWorkerError


class AbstractWorker(abc.ABC):  # noqa: B024 (the tests' mock workers define the methods)
    pass


class WorkerCache(collections.deque[Any], abc.ABC):
    pass
