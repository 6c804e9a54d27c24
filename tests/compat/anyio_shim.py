"""A pytest plugin that makes ``anyio.to_process``'s public functions trio_fork's.

``tests/compat/run.py`` loads it (``-p anyio_shim``) into the run of anyio's own
``tests/test_to_process.py``, which calls ``to_process.run_sync`` through the module,
so every call it makes goes to ``trio_fork.run_sync``, with the same arguments.
"""

from __future__ import annotations

import anyio.to_process

import trio_fork

anyio.to_process.run_sync = trio_fork.run_sync  # type: ignore[assignment]
anyio.to_process.current_default_process_limiter = trio_fork.current_default_worker_limiter
