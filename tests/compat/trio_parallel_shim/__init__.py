"""A stand-in for the ``trio_parallel`` package whose public names are trio_fork's.

``tests/compat/run.py`` copies this package, as ``trio_parallel``, next to the
``_tests`` of the trio-parallel wheel it downloads, so that trio-parallel's own tests
import trio_fork wherever they import trio-parallel. The names are bound here, as
trio-parallel's ``__init__`` binds them, so that its ``test_nice_names`` sees them.
"""

from __future__ import annotations

from ._abc import BrokenWorkerError as BrokenWorkerError
from ._impl import _PUBLIC, __getattr__

for _name in _PUBLIC:
    try:
        globals()[_name] = __getattr__(_name)
    except AttributeError:
        pass  # not in trio_fork: using it fails the tests that do, and only those
del _name
