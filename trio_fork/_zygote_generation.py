"""One template of a ``trio_fork run`` server's life, and the children forked from it.

A server's template lives as long as the files it was built from stay as they were
(:mod:`._zygote_fresh`); when they change, the server starts a new template, a new
*generation*, and the old one ends once its last run is over. Runs do not wait for a
fork: each generation keeps :data:`SPARES` children forked ahead of time, waiting in
``trio_fork.worker._program.serve``, and forks one more for each run waiting for one.
"""

from __future__ import annotations

import os
import sys
import time

import anyio
import attrs
from anyio.abc import TaskGroup, TaskStatus

from ._child import Child
from ._errors import BrokenTemplateError, RemoteError
from ._open import open_template
from ._template import Template
from ._zygote_fresh import Fingerprint, watched_paths

PROGRAM_MODULE = "trio_fork.worker._program"
SPARES = 2
"""Children kept forked and waiting for a run, per template."""


@attrs.define(eq=False)
class Spare:
    """A child forked ahead of time, waiting in ``_program.serve`` for a run."""

    child: Child
    pidfd: int  # the child's own: unlike its pid, it never names another process
    released: anyio.Event = attrs.field(factory=anyio.Event)


@attrs.define(eq=False)
class Generation:
    """A template, its spares, and how many runs (or armed spares) hold it."""

    number: int
    template: Template
    fingerprint: Fingerprint
    keepers: TaskGroup
    idle: list[Spare] = attrs.field(factory=list)
    starting: int = 0
    waiting: int = 0
    changed: anyio.Event = attrs.field(factory=anyio.Event)
    runs: int = 0
    retired: bool = False
    broken: bool = False
    done: anyio.Event = attrs.field(factory=anyio.Event)

    def stale(self) -> str | None:
        """Why the next run must come from a new template, or None."""
        if self.broken:
            return "the template died"
        changed = self.fingerprint.changed()
        return None if changed is None else f"{changed} changed"

    def retire(self) -> None:
        """No new runs: end once the last one is over."""
        self.retired = True
        self.leave(0)

    def leave(self, runs: int = 1) -> None:
        self.runs -= runs
        if self.retired and not self.runs:
            self.done.set()

    async def take(self) -> Spare:
        """A spare for a run, forking one if none is waiting; the caller owns a run."""
        self.waiting += 1
        try:
            while not self.idle:
                if self.broken:
                    raise BrokenTemplateError(f"the template of generation {self.number} died")
                self.top_up()
                await self.changed.wait()
            spare = self.idle.pop(0)
        finally:
            self.waiting -= 1
        self.top_up()
        return spare

    def top_up(self) -> None:
        if self.retired or self.broken:
            return
        for _ in range(SPARES + self.waiting - len(self.idle) - self.starting):
            self.starting += 1
            self.keepers.start_soon(self._keep_spare)

    async def _keep_spare(self) -> None:
        spare = None
        try:
            async with self.template.spawn(f"{PROGRAM_MODULE}:serve") as child:
                spare = Spare(child, os.dup(child._process._pidfd))  # type: ignore[arg-type]
                self.starting -= 1
                self.idle.append(spare)
                self._wake()
                # The block's end waits for the child: a program that ran, or a spare
                # that sees its socket closed and exits.
                await spare.released.wait()
        except (BrokenTemplateError, RemoteError, OSError) as exc:
            self.broken = True
            sys.stderr.write(f"trio_fork serve: generation {self.number} cannot fork: {exc}\n")
        finally:
            if spare is None:
                self.starting -= 1
            else:
                os.close(spare.pidfd)
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


async def keep_generation(
    number: int, preload: list[str], *, task_status: TaskStatus[Generation]
) -> None:
    """Start a template with ``preload``, hand out its generation, and end it when done."""
    since = time.time_ns()
    # A new interpreter, not a fork of the process-wide default template: a new
    # generation must import what is on disk now, the interpreter included.
    async with open_template(preload, fresh=True) as template:
        await template.require(PROGRAM_MODULE)
        files = await _module_files(template)
        fingerprint = Fingerprint.of(watched_paths(files, sys.path), since)
        async with anyio.create_task_group() as keepers:
            generation = Generation(number, template, fingerprint, keepers)
            generation.top_up()
            task_status.started(generation)
            await generation.done.wait()
            keepers.cancel_scope.cancel()


async def _module_files(template: Template) -> list[str]:
    async with template.spawn(f"{PROGRAM_MODULE}:report_files") as child:
        data = bytearray()
        async for chunk in child.stream:
            data += chunk
    return [os.fsdecode(name) for name in bytes(data).split(b"\0") if name]
