"""Which template a pool forks its next worker from, when it has several.

A pool may spread its workers over several templates, local and remote, each with
its own most workers at once. A new worker goes to the template with the most room
for its size (the fewest workers for its ``max``; the first given on a tie), and
waits, if every template is full, until a worker of one has ended: the pool's policy
counts a worker gone a moment before its process has been reaped, and a template's
``max`` is never exceeded, not even for that moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import attrs

if TYPE_CHECKING:
    from ._remote import RemoteTemplate
    from ._template import Template

    AnyTemplate = Template | RemoteTemplate


@attrs.define(eq=False)
class Placements:
    """The templates of one pool, their ``max`` each, and their workers now."""

    templates: list[AnyTemplate]
    limits: list[int]
    counts: list[int]
    _freed: anyio.Event = attrs.field(factory=anyio.Event)

    @classmethod
    def of(cls, templates: object, default_max: int) -> Placements:
        """From a template, or a sequence of templates and ``(template, max)`` pairs."""
        from ._remote import RemoteTemplate
        from ._template import Template

        kinds = (Template, RemoteTemplate)
        entries = [templates] if isinstance(templates, kinds) else templates
        if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
            raise TypeError(
                "template: expected a template, or a non-empty sequence of templates and "
                f"(template, max) pairs, got {templates!r}"
            )
        found: list[AnyTemplate] = []
        limits: list[int] = []
        for entry in entries:
            template, limit = (
                entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, default_max)
            )
            if not isinstance(template, kinds):
                raise TypeError(f"template: {template!r} is not a template")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(
                    f"template: the max of {template!r} must be an int >= 1, not {limit!r}"
                )
            if any(template is other for other in found):
                raise ValueError(f"template: {template!r} is given twice")
            found.append(template)
            limits.append(limit)
        return cls(found, limits, [0] * len(found))

    @property
    def total(self) -> int:
        return sum(self.limits)

    async def take(self) -> int:
        """The index of the template to fork the next worker from, counted as taken."""
        while True:
            room = [
                (count / limit, index)
                for index, (count, limit) in enumerate(zip(self.counts, self.limits, strict=True))
                if count < limit
            ]
            if room:
                index = min(room)[1]
                self.counts[index] += 1
                return index
            self._freed = anyio.Event()
            await self._freed.wait()

    def release(self, index: int) -> None:
        """A worker forked from template ``index`` is gone."""
        self.counts[index] -= 1
        self._freed.set()
