"""A value that follows the task tree on trio, and the context on asyncio: ``cache_scope``'s.

``trio_parallel.cache_scope()`` replaces the default worker context for the tasks
*below* it in the task tree, whoever starts them: a task started from inside the
block into a nursery opened before it does not see the block's context, and a task
started from outside into a nursery opened inside it does. Context variables follow
who started a task instead. trio_parallel uses ``tricycle.TreeVar``; this keeps, as
TreeVar does, a value per task and the value each of its nurseries was opened with,
found from trio's public task attributes (``parent_nursery``,
``eventual_parent_nursery``, ``child_nurseries``), without the dependency.

asyncio has no task tree: a task runs in a copy of its starter's context (in anyio
task groups too), so there the value is a context variable.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs

if TYPE_CHECKING:
    import trio

T = TypeVar("T")


@attrs.define(eq=False, slots=True)
class _TaskState(Generic[T]):
    task: weakref.ref[trio.lowlevel.Task]
    value: T | None
    # What each nursery of the task was opened with: its children start with that.
    for_children: weakref.WeakKeyDictionary[trio.Nursery, T | None] = attrs.field(
        factory=weakref.WeakKeyDictionary
    )

    def save_for_children(self) -> None:
        task = self.task()
        if task is not None:
            for nursery in task.child_nurseries:
                self.for_children.setdefault(nursery, self.value)


class TaskTreeValue(Generic[T]):
    """A value set for a block (:meth:`being`) and seen by the tasks below it; else None."""

    def __init__(self, name: str) -> None:
        self._var: contextvars.ContextVar[object] = contextvars.ContextVar(name)
        # Blocks open in this process, in any thread: while there are none, get() looks
        # nothing up, so that run_sync pays nothing for cache_scope unless it is used.
        self._blocks = 0
        self._lock = threading.Lock()

    def get(self, backend: str) -> T | None:
        if not self._blocks:
            return None
        if backend == "trio":
            import trio

            return self._state(trio.lowlevel.current_task()).value
        return self._var.get(None)  # type: ignore[return-value]

    @contextmanager
    def being(self, backend: str, value: T) -> Iterator[None]:
        with self._lock:
            self._blocks += 1
        try:
            if backend == "trio":
                import trio

                state = self._state(trio.lowlevel.current_task())
                # Nurseries opened before the block keep what they were opened with.
                state.save_for_children()
                previous, state.value = state.value, value
                try:
                    yield
                finally:
                    state.save_for_children()
                    state.value = previous
            else:
                token = self._var.set(value)
                try:
                    yield
                finally:
                    self._var.reset(token)
        finally:
            with self._lock:
                self._blocks -= 1

    def _state(self, task: trio.lowlevel.Task) -> _TaskState[T]:
        """The task's state; on its first use in the task, inherited from its nursery."""
        state = task.context.get(self._var)
        if isinstance(state, _TaskState) and state.task() is task:
            return state
        # A task started with nursery.start() belongs, even before it calls started(),
        # to the nursery it is being started into.
        nursery = task.eventual_parent_nursery or task.parent_nursery
        inherited: T | None = None
        if nursery is not None:
            parent = self._state(nursery.parent_task)
            inherited = parent.for_children.get(nursery, parent.value)
        new: _TaskState[T] = _TaskState(weakref.ref(task), inherited)
        import trio

        if task.context is trio.lowlevel.current_task().context:
            self._var.set(new)
        else:
            task.context.run(self._var.set, new)
        return new
