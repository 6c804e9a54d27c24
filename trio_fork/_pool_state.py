"""The pool's bookkeeping: which worker gets which call, and when workers come and go.

Sans-I/O, in the manner of httpcore's connection pool: every change of state is a
synchronous method that returns the :class:`Actions` it calls for (workers to start,
calls to send, workers to close, calls to fail), and the I/O layer performs them.
Nothing here awaits, so no state change can be cut in half by a cancellation.

The policy is AnyEvent::Fork::Pool's. A call goes to the least loaded ready worker
that has fewer than ``load`` calls; when there is none it waits in the queue, and a
new worker is started if fewer than ``max`` exist, at most one every ``start``
seconds (the first one at once). At least ``idle`` workers are kept (starting or
without calls); a worker beyond those that has had no call for ``stop`` seconds is
closed, and so is a worker that has been given ``retire`` calls, once they are done.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._call import Request
    from ._connection import Connection


class Status(enum.Enum):
    """Where a worker is in its life."""

    STARTING = "starting"
    READY = "ready"
    CLOSING = "closing"
    GONE = "gone"


STARTING = Status.STARTING
READY = Status.READY
CLOSING = Status.CLOSING
GONE = Status.GONE


@attrs.define(eq=False)
class Slot:
    """One worker, as the pool sees it."""

    number: int
    status: Status = STARTING
    connection: Connection | None = None
    assigned: int = 0
    """Calls sent and not yet answered."""
    given: int = 0
    """Calls sent over the worker's life, for ``retire``."""
    idle_since: float = 0.0
    last_used: float = -math.inf


@attrs.define(eq=False)
class Actions:
    start: list[Slot] = attrs.field(factory=list)
    send: list[tuple[Slot, Request]] = attrs.field(factory=list)
    close: list[Slot] = attrs.field(factory=list)
    fail: list[tuple[Request, BaseException]] = attrs.field(factory=list)
    timer: bool = False
    """Starts are being paced: :meth:`PoolState.next_deadline` may have moved earlier."""


NOTHING = Actions()
"""No actions: returned, never changed, when there is nothing to do."""

DEATHS_IN_A_ROW = 3
"""Workers that may die while starting, with none ready in between, before the start-up
itself is taken to be what kills them (and starting is a failure, see
:meth:`PoolState.worker_died_starting`)."""


@attrs.frozen
class Limits:
    max: int | None
    idle: int
    load: int
    start: float
    stop: float
    retire: int | None


@attrs.define(eq=False)
class PoolState:
    limits: Limits
    slots: list[Slot] = attrs.field(factory=list)
    queue: deque[Request] = attrs.field(factory=deque)
    closing: bool = False
    last_start: float = -math.inf
    start_failed: bool = False
    """The last start failed: no more starts until a new call asks for one."""
    deaths_in_a_row: int = 0
    """Workers that died while starting since a worker was last ready."""
    _numbers: int = 0

    # Events.

    def open(self, now: float) -> Actions:
        """Start the ``idle`` workers at once, whatever ``start`` says."""
        actions = Actions()
        for _ in range(self._room(self.limits.idle)):
            self._start(actions, now)
        return actions

    def submit(self, request: Request, now: float) -> Actions:
        self.start_failed = False
        self.queue.append(request)
        if len(self.queue) == 1 and self.limits.idle == 0:
            # The common case, kept short: a worker is free. Nothing else changes
            # (retiring happens when calls finish, and no spare workers are kept).
            actions = Actions()
            self._assign(actions, now)
            if actions.send:
                return actions
        return self._schedule(now)

    def withdraw(self, request: Request) -> bool:
        """Take back a call that was never sent; False if it is not queued."""
        try:
            self.queue.remove(request)
        except ValueError:
            return False
        return True

    def requeue(self, request: Request) -> None:
        """A call that provably never started on a worker that died: send it again."""
        request.connection = None
        request.id = 0
        self.queue.appendleft(request)

    def worker_started(self, slot: Slot, connection: Connection) -> None:
        """A worker process exists: calls will go through ``connection``."""
        slot.connection = connection

    def call_lost(self, slot: Slot) -> None:
        """A call of a worker that died was settled (its loss comes once, later)."""
        slot.assigned -= 1

    def abandon(self, error: BaseException) -> Actions:
        """The pool is going away at once: calls still queued fail with ``error``."""
        self.closing = True
        actions = Actions()
        while self.queue:
            actions.fail.append((self.queue.popleft(), error))
        return actions

    def worker_ready(self, slot: Slot, now: float) -> Actions:
        slot.status = READY
        slot.idle_since = now
        self.start_failed = False
        self.deaths_in_a_row = 0
        return self._schedule(now)

    def worker_died_starting(self, slot: Slot, error: BaseException, now: float) -> Actions:
        """A worker died before it was ready: killed, say, or by the OOM killer.

        It is replaced at once if it is still needed, as a worker that dies later
        would be. But when :data:`DEATHS_IN_A_ROW` have died so, with none ready in
        between, what kills them is taken to be their start-up (an ``init`` that
        exits the process, say): that death is a failure (:meth:`worker_failed`).
        """
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row >= DEATHS_IN_A_ROW:
            return self.worker_failed(slot, error, now)
        slot.status = GONE
        self.slots.remove(slot)
        actions = Actions()
        if not self.start_failed and self._shortfall() > 0:
            self._start(actions, now)
        return self._schedule(now, actions)

    def worker_failed(self, slot: Slot, error: BaseException, now: float) -> Actions:
        """A worker could not start: the calls nobody else can serve fail with its error.

        No worker is started in its place until a new call asks for one, so that a
        broken ``init`` cannot make the pool fork in a loop.
        """
        slot.status = GONE
        self.slots.remove(slot)
        self.start_failed = True
        actions = Actions()
        if not any(other.status in (STARTING, READY) for other in self.slots):
            while self.queue:
                actions.fail.append((self.queue.popleft(), error))
        return self._schedule(now, actions)

    def call_finished(self, slot: Slot, now: float) -> Actions:
        slot.assigned -= 1
        if slot.assigned == 0:
            slot.idle_since = now
        retire = self.limits.retire
        if self.queue or self.closing or (retire is not None and slot.given >= retire):
            return self._schedule(now)
        # The common case, kept short: nobody waits and this worker carries on.
        # (Stopping idle workers is the timer's job.)
        return NOTHING

    def worker_gone(self, slot: Slot, now: float) -> Actions:
        slot.status = GONE
        if slot in self.slots:
            self.slots.remove(slot)
        return self._schedule(now)

    def worker_retiring(self, slot: Slot, now: float) -> Actions:
        """The worker will exit after its current call: it takes no more."""
        slot.status = CLOSING
        return self._schedule(now)

    def tick(self, now: float) -> Actions:
        return self._schedule(now)

    def close(self, now: float) -> Actions:
        """Workers close as soon as they and the queue have no calls left."""
        self.closing = True
        return self._schedule(now)

    # Queries.

    def next_deadline(self) -> float:
        """When :meth:`tick` next has something to do (``inf``: nothing planned)."""
        deadline = math.inf
        limits = self.limits
        if self.queue and not self.start_failed and self._wanted_for_queue() and self._room(1):
            deadline = self.last_start + limits.start
        if limits.stop < math.inf:
            idle = [slot for slot in self.slots if self._idle(slot)]
            if len(idle) > limits.idle:
                deadline = min(deadline, min(slot.idle_since for slot in idle) + limits.stop)
        return deadline

    def statistics(self) -> dict[str, int]:
        counts = dict.fromkeys(Status, 0)
        busy = running = 0
        for slot in self.slots:
            counts[slot.status] += 1
            running += slot.assigned
            busy += slot.status == READY and slot.assigned > 0
        return {
            "workers": len(self.slots),
            "starting_workers": counts[STARTING],
            "idle_workers": counts[READY] - busy,
            "busy_workers": busy,
            "closing_workers": counts[CLOSING],
            "queued_calls": len(self.queue),
            "running_calls": running,
        }

    # Policy.

    def _schedule(self, now: float, actions: Actions | None = None) -> Actions:
        if actions is None:
            actions = Actions()
        self._assign(actions, now)
        self._retire_and_stop(actions, now)
        self._grow(actions, now)
        return actions

    def _assign(self, actions: Actions, now: float) -> None:
        queue = self.queue
        while queue:
            best: Slot | None = None
            for slot in self.slots:
                if not self._accepts(slot):
                    continue
                # Least loaded first; among equals the one used last, so that the
                # others stay idle long enough to be stopped.
                if (
                    best is None
                    or slot.assigned < best.assigned
                    or (slot.assigned == best.assigned and slot.last_used > best.last_used)
                ):
                    best = slot
            if best is None:
                return
            request = queue.popleft()
            best.assigned += 1
            best.given += 1
            best.last_used = now
            actions.send.append((best, request))

    def _accepts(self, slot: Slot) -> bool:
        retire = self.limits.retire
        return (
            slot.status == READY
            and slot.assigned < self.limits.load
            and (retire is None or slot.given < retire)
        )

    def _retire_and_stop(self, actions: Actions, now: float) -> None:
        limits = self.limits
        idle: list[Slot] = []
        for slot in self.slots:
            if slot.status != READY or slot.assigned:
                continue
            if (self.closing and not self.queue) or (
                limits.retire is not None and slot.given >= limits.retire
            ):
                self._close(slot, actions)
            else:
                idle.append(slot)
        excess = len(idle) - limits.idle
        if excess <= 0 or limits.stop == math.inf:
            return
        # The longest idle go first.
        idle.sort(key=lambda slot: slot.idle_since)
        for slot in idle[:excess]:
            if slot.idle_since + limits.stop <= now:
                self._close(slot, actions)

    def _grow(self, actions: Actions, now: float) -> None:
        if self.start_failed:
            return
        limits = self.limits
        wanted = self._shortfall()
        if wanted <= 0:
            return
        if limits.start > 0:
            # Paced: the next start (if still wanted then) is due at a new time.
            actions.timer = True
            serving = any(slot.status in (STARTING, READY) for slot in self.slots)
            if serving and now < self.last_start + limits.start:
                return
            wanted = 1
        for _ in range(wanted):
            self._start(actions, now)

    def _shortfall(self) -> int:
        """Workers to start now, were starts not paced."""
        wanted = self._wanted_for_queue()
        # A closing pool still serves the calls it took, but keeps no spare workers.
        if not self.closing:
            available = sum(1 for slot in self.slots if slot.status == STARTING or self._idle(slot))
            wanted = max(wanted, self.limits.idle - available)
        return self._room(wanted)

    def _wanted_for_queue(self) -> int:
        """Workers to start so that every queued call has a place."""
        load = self.limits.load
        coming = sum(load for slot in self.slots if slot.status == STARTING)
        missing = len(self.queue) - coming
        return -(-missing // load) if missing > 0 else 0

    def _room(self, wanted: int) -> int:
        """How many of ``wanted`` new workers ``max`` allows."""
        if self.limits.max is None:
            return max(wanted, 0)
        alive = sum(1 for slot in self.slots if slot.status != CLOSING)
        return max(0, min(wanted, self.limits.max - alive))

    def _idle(self, slot: Slot) -> bool:
        return slot.status == READY and slot.assigned == 0

    def _start(self, actions: Actions, now: float) -> None:
        self._numbers += 1
        slot = Slot(self._numbers)
        self.slots.append(slot)
        self.last_start = now
        actions.start.append(slot)

    def _close(self, slot: Slot, actions: Actions) -> None:
        slot.status = CLOSING
        actions.close.append(slot)
