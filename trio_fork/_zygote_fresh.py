"""Whether a ``trio_fork run`` template still is what a fresh interpreter would import.

A template imported its modules once; ``python script.py`` reads them every time. So
that a run never sees code older than the files on disk, the server notes, for every
file the template loaded beyond the standard library (the preloaded modules and what
they imported), for the interpreter (whose upgrade brings a new standard library) and
for every directory on the import path (a package installed or removed changes it),
when it last changed; and it is checked before each run. One ``stat`` a file: well
under a millisecond for numpy's 150 files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import attrs

Signature = tuple[int, int, int, int] | None
"""What ``stat`` says of a path (change times, size, inode); None if it is missing."""

# A file changes at a time the kernel reads from a clock that lags by up to a tick (4
# ms at 250 Hz): one whose change time is this close to the template's start may have
# changed after it, and been imported as it was before.
_MARGIN_NS = 10_000_000


def signature(path: str) -> Signature:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino


@attrs.frozen
class Fingerprint:
    """The signatures of what a template was built from."""

    files: tuple[tuple[str, Signature], ...]

    @classmethod
    def of(cls, paths: Iterable[str], since_ns: int) -> Fingerprint:
        """The signatures of ``paths`` now, for a template whose start began at ``since_ns``.

        A file that changed while the template started may have been imported as it
        was before: it is recorded as unknown, so that the next check finds it changed.
        """
        files = []
        for path in dict.fromkeys(paths):
            now = signature(path)
            if now is not None and now[1] >= since_ns - _MARGIN_NS:
                now = (-1, -1, -1, -1)
            files.append((path, now))
        return cls(tuple(files))

    def encode(self) -> bytes:
        """The fingerprint as ``trio_fork.worker._program`` checks it: path, then signature."""
        fields = []
        for path, then in self.files:
            if then is None:
                check = b"-"
            elif then[0] < 0:
                check = b"?"  # matches nothing: a new template is due
            else:
                check = b"%d %d %d %d" % then
            fields += [os.fsencode(path), check]
        return b"\0".join(fields)

    def changed(self) -> str | None:
        """The first path that changed since, or None."""
        for path, then in self.files:
            if signature(path) != then:
                return path
        return None


def watched_paths(module_files: Iterable[str], import_path: Iterable[str]) -> list[str]:
    """What a template depends on: its modules' files, the interpreter, the import path.

    Not the standard library's files, which change with the interpreter.
    """
    import sysconfig

    stdlib = tuple(
        os.path.join(sysconfig.get_paths()[name], "") for name in ("stdlib", "platstdlib")
    )
    paths = [sys.executable, os.path.realpath(sys.executable)]
    paths += [path for path in import_path if os.path.isabs(path)]
    paths += [path for path in module_files if os.path.isabs(path) and not path.startswith(stdlib)]
    return paths
