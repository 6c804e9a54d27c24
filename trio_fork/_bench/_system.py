"""What the bench reads from the system: the machine, memory figures, and ballast."""

from __future__ import annotations

import importlib.metadata
import mmap
import os
import platform
import sys

from ._forkloop import resident_bytes as resident_bytes


def memory_use(pid: int) -> tuple[int, int]:
    """The PSS and the USS of process ``pid``, in bytes.

    PSS is its private memory plus its share of the pages it shares: a page shared by
    ``n`` processes counts ``1/n`` towards each, so the PSS of a group of processes
    adds up to the memory the group uses. USS is its private memory alone: what
    ending it would give back.
    """
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if value.endswith("kB\n"):
                fields[name] = int(value.split()[0]) * 1024
    private = fields["Private_Clean"] + fields["Private_Dirty"] + fields["Private_Hugetlb"]
    return fields["Pss"], private


class Ballast:
    """Private, resident memory held by this process, to make its fork expensive.

    Held in chunks, so that growing it maps only the difference and shrinking it
    unmaps whole chunks. Each chunk is populated at once (``MAP_POPULATE``), several
    times quicker than touching every page from Python, and costs a fork the same:
    one page table entry per 4 KiB page to copy.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[int, mmap.mmap]] = []

    def __enter__(self) -> Ballast:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.resize(0)

    @property
    def megabytes(self) -> int:
        return sum(size for size, _ in self._chunks)

    def resize(self, megabytes: int) -> None:
        while self.megabytes > megabytes:
            _, chunk = self._chunks.pop()
            chunk.close()
        if self.megabytes < megabytes:
            size = megabytes - self.megabytes
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
            self._chunks.append((size, mmap.mmap(-1, size << 20, flags=flags)))


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def _first_line_with(path: str, prefix: str) -> str | None:
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _transparent_hugepages() -> str | None:
    # The kernel marks the mode in force with brackets: "always [madvise] never".
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            modes = file.read().split()
    except OSError:
        return None
    return next((mode[1:-1] for mode in modes if mode.startswith("[")), None)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, object]:
    """The facts that a reader needs to compare two runs of the bench."""
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": _first_line_with("/proc/cpuinfo", "model name"),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "transparent_hugepages": _transparent_hugepages(),
        "versions": {
            name: package_version(name)
            for name in ("trio_fork", "trio", "anyio", "trio-parallel", "numpy", "matplotlib")
        },
    }
