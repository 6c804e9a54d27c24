"""The progress display on stderr, so that stdout carries only the results."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """Counts the bench's steps and shows the current one.

    On a terminal the display is one line, rewritten in place; anywhere else (a log,
    a pipe) each step gets a line of its own.
    """

    def __init__(self, stream: TextIO, total: int) -> None:
        self._stream = stream
        self._total = total
        self._done = 0
        self._start = time.perf_counter()
        self._live = stream.isatty()

    def step(self, text: str, *, count: int = 1) -> None:
        """Show the step starting now, which completes ``count`` of the total."""
        self._done += count
        self.show(text)

    def show(self, text: str) -> None:
        """Show what is happening now without advancing the count."""
        elapsed = time.perf_counter() - self._start
        line = f"bench [{self._done:>3}/{self._total}] {elapsed:5.1f} s  {text}"
        if self._live:
            self._stream.write(f"\r\x1b[2K{line}")
        else:
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def finish(self) -> None:
        elapsed = time.perf_counter() - self._start
        if self._live:
            self._stream.write("\r\x1b[2K")
        self._stream.write(f"bench finished in {elapsed:.1f} s\n")
        self._stream.flush()
