"""The pool's policy on its own: no processes, no event loop, time given by hand."""

from __future__ import annotations

import math

from trio_fork._call import Request
from trio_fork._pool_state import CLOSING, Actions, Limits, PoolState, Slot


def limits(**overrides: object) -> Limits:
    values: dict[str, object] = {
        "max": 4,
        "idle": 0,
        "load": 1,
        "start": 0.0,
        "stop": math.inf,
        "retire": None,
    }
    values.update(overrides)
    return Limits(**values)  # type: ignore[arg-type]


def request() -> Request:
    return Request(b"", False)


def ready(state: PoolState, actions: Actions, now: float = 0.0) -> Actions:
    """Every worker the actions start becomes ready; what the pool does next."""
    follow = Actions()
    for slot in actions.start:
        more = state.worker_ready(slot, now)
        follow.start += more.start
        follow.send += more.send
        follow.close += more.close
    return follow


def test_a_call_starts_a_worker_then_goes_to_it() -> None:
    state = PoolState(limits())
    first = request()
    actions = state.submit(first, 0.0)
    assert len(actions.start) == 1
    assert actions.send == []
    sent = ready(state, actions).send
    assert sent == [(actions.start[0], first)]
    assert state.statistics()["running_calls"] == 1


def test_calls_go_to_the_least_loaded_worker_then_wait() -> None:
    state = PoolState(limits(max=2, load=2))
    a, b, c, d, e = (request() for _ in range(5))
    started = state.submit(a, 0.0).start
    first = started[0]
    assert ready(state, state_actions(started)).send == [(first, a)]
    # The first worker has room for a second call: no new worker.
    assert state.submit(b, 0.0).send == [(first, b)]
    # Now it is full: the third call waits for a new worker.
    waiting = state.submit(c, 0.0)
    assert waiting.send == []
    second = waiting.start[0]
    assert ready(state, waiting).send == [(second, c)]
    # The least loaded worker gets the next call.
    assert state.submit(d, 0.0).send == [(second, d)]
    # Both are full and max is reached: the fifth call waits, and nothing starts.
    full = state.submit(e, 0.0)
    assert (full.start, full.send) == ([], [])
    assert state.statistics()["queued_calls"] == 1
    assert state.call_finished(first, 1.0).send == [(first, e)]


def state_actions(started: list[Slot]) -> Actions:
    return Actions(start=started)


def test_starts_are_paced_by_start() -> None:
    state = PoolState(limits(start=1.0, max=3))
    first = state.submit(request(), 10.0)
    assert len(first.start) == 1
    # The first worker is still starting: more calls wait for the pace.
    second = state.submit(request(), 10.2)
    assert second.start == []
    assert second.timer
    assert state.next_deadline() == 11.0
    assert len(state.tick(11.0).start) == 1
    assert state.tick(11.5).start == []
    assert len(state.tick(12.0).start) == 0  # the two starting workers cover both calls


def test_without_pacing_every_waiting_call_gets_a_worker() -> None:
    state = PoolState(limits(max=3))
    starts = [state.submit(request(), 0.0).start for _ in range(5)]
    assert [len(started) for started in starts] == [1, 1, 1, 0, 0]


def test_idle_workers_beyond_idle_stop_after_stop_seconds() -> None:
    state = PoolState(limits(idle=1, stop=5.0))
    opened = state.open(0.0)
    assert len(opened.start) == 1
    first = opened.start[0]
    state.worker_ready(first, 0.0)
    # The idle worker takes a call, so another is started to keep one idle.
    submitted = state.submit(request(), 0.0)
    assert submitted.send == [(first, submitted.send[0][1])]
    second = submitted.start[0]
    state.worker_ready(second, 0.5)
    state.call_finished(first, 1.0)
    # Two idle workers where one is wanted: the one idle longest goes at 0.5 + 5.
    assert state.next_deadline() == 5.5
    assert state.tick(5.4).close == []
    assert state.tick(5.5).close == [second]
    assert second.status == CLOSING
    assert state.next_deadline() == math.inf
    state.worker_gone(second, 6.0)
    assert state.slots == [first]
    # The last one stays however long it idles.
    assert state.tick(1000.0).close == []


def test_workers_retire_after_so_many_calls() -> None:
    state = PoolState(limits(retire=2, max=1))
    first, second, waiting = request(), request(), request()
    slot = state.submit(first, 0.0).start[0]
    ready(state, state_actions([slot]))
    assert state.call_finished(slot, 0.0).close == []
    assert state.submit(second, 0.0).send == [(slot, second)]
    # That was its last call: a waiting call gets a new worker once it is gone.
    assert state.submit(waiting, 0.0).send == []
    # A closing worker does not count towards max: its replacement starts at once.
    finished = state.call_finished(slot, 1.0)
    assert finished.close == [slot]
    assert len(finished.start) == 1
    assert ready(state, finished).send == [(finished.start[0], waiting)]
    assert state.worker_gone(slot, 1.1).start == []


def test_a_worker_that_fails_to_start_fails_the_calls_nobody_else_can_serve() -> None:
    state = PoolState(limits(max=4))
    first, second = request(), request()
    one = state.submit(first, 0.0).start[0]
    two = state.submit(second, 0.0).start[0]
    error = RuntimeError("init failed")
    # Another worker is still starting: it may serve both calls.
    failed = state.worker_failed(one, error, 0.0)
    assert (failed.fail, failed.start) == ([], [])
    # Nobody is left: the calls fail, and no worker is started in a loop.
    failed = state.worker_failed(two, error, 0.0)
    assert failed.fail == [(first, error), (second, error)]
    assert failed.start == []
    assert state.tick(1.0).start == []
    # A new call tries again.
    assert len(state.submit(request(), 1.0).start) == 1


def test_requeued_calls_go_first_to_the_next_worker() -> None:
    state = PoolState(limits(max=1, load=2))
    first, second = request(), request()
    ready(state, state.submit(first, 0.0))
    state.submit(second, 0.0)
    slot = state.slots[0]
    assert slot.assigned == 2
    # The worker dies running "first"; "second" never started and comes back.
    state.requeue(second)
    assert list(state.queue) == [second]
    gone = state.worker_gone(slot, 1.0)
    assert len(gone.start) == 1
    assert ready(state, gone).send == [(gone.start[0], second)]


def test_close_serves_the_queue_then_closes_everything() -> None:
    state = PoolState(limits(max=1))
    ready(state, state.submit(request(), 0.0))
    slot = state.slots[0]
    waiting = request()
    state.submit(waiting, 0.0)
    assert state.close(1.0).close == []
    finished = state.call_finished(slot, 2.0)
    assert finished.send == [(slot, waiting)]
    assert state.call_finished(slot, 3.0).close == [slot]


def test_statistics_count_every_state() -> None:
    state = PoolState(limits(max=3, idle=1, stop=5.0))
    first = state.open(0.0).start[0]
    assert state.statistics()["starting_workers"] == 1
    state.worker_ready(first, 0.0)
    # The idle worker takes a call, and a spare one starts.
    spare = state.submit(request(), 0.0).start[0]
    state.submit(request(), 0.0)
    assert state.statistics() == {
        "workers": 2,
        "starting_workers": 1,
        "idle_workers": 0,
        "busy_workers": 1,
        "closing_workers": 0,
        "queued_calls": 1,
        "running_calls": 1,
    }
    # The spare takes the waiting call, so a third starts to be the idle one.
    third = state.worker_ready(spare, 0.0).start[0]
    state.worker_ready(third, 0.0)
    state.call_finished(first, 1.0)
    state.call_finished(spare, 2.0)
    # At 6, the two idle since 0 and 1 have waited 5 seconds; one worker stays.
    assert state.tick(6.0).close == [third, first]
    assert state.statistics() == {
        "workers": 3,
        "starting_workers": 0,
        "idle_workers": 1,
        "busy_workers": 0,
        "closing_workers": 2,
        "queued_calls": 0,
        "running_calls": 0,
    }
