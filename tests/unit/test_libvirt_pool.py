"""The call connections: one call per connection, stuck ones set aside, bounded."""

import pytest

from compute_agent import exception, green
from compute_agent.virt.libvirt.pool import ConnectionPool


class Raw:
    """A stand-in raw connection that records how many calls are inside it at once."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.inside = 0
        self.most_inside = 0
        self.closed = False
        self._lock = green.native_lock()

    def call(self, work) -> int:
        assert not self.closed, "a call on a closed connection"
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            work()
        finally:
            with self._lock:
                self.inside -= 1
        return self.number


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(size=2, stuck_after=5.0, max_stuck=2, clock=None, recheck=0.1):
    opened: list[Raw] = []

    def open_raw():
        raw = Raw(len(opened))
        opened.append(raw)
        return raw

    def close(connection):
        assert connection.raw.inside == 0, "closed with a call inside"
        connection.raw.closed = True

    pool = ConnectionPool(
        open_raw,
        close,
        size=size,
        stuck_after=stuck_after,
        max_stuck=max_stuck,
        clock=clock or green.monotonic,
        recheck=recheck,
    )
    return pool, opened


def test_no_connection_ever_carries_two_calls():
    pool, opened = make_pool(size=3)

    def one(_):
        return pool.run(0, lambda raw: raw.call(lambda: green.native_sleep(0.002)))

    tasks = [green.spawn(one, i) for i in range(60)]
    for task in tasks:
        task.wait()
    assert 1 <= len(opened) <= 3
    assert all(raw.most_inside == 1 for raw in opened)
    stats = pool.statistics()
    assert (stats.busy, stats.open, stats.stuck) == (0, len(opened), 0)


def test_a_stuck_call_is_set_aside_and_a_new_connection_carries_the_rest():
    clock = Clock()
    pool, opened = make_pool(size=1, stuck_after=5.0, clock=clock)
    release = green.native_event()
    stuck = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: release.wait(10)))
    green.sleep(0.05)
    assert pool.in_flight == 1
    waiting = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: None))
    green.sleep(0.05)
    assert not waiting.done()  # the only connection is busy, not yet stuck
    clock.now += 5.0
    assert waiting.wait() == 1  # a second connection carried it
    stats = pool.statistics()
    assert (stats.stuck, stats.stuck_total, stats.busy) == (1, 1, 1)
    release.set()
    assert stuck.wait() == 0
    for _ in range(100):
        if opened[0].closed:
            break
        green.sleep(0.01)
    assert opened[0].closed  # closed by its own thread once the call returned
    assert not opened[1].closed
    stats = pool.statistics()
    assert (stats.stuck, stats.busy, stats.open) == (0, 0, 1)


def test_set_aside_connections_are_bounded():
    clock = Clock()
    pool, opened = make_pool(size=1, stuck_after=1.0, max_stuck=2, clock=clock)
    release = green.native_event()
    hung = []
    for _ in range(3):
        hung.append(green.spawn(pool.run, 0, lambda raw: raw.call(lambda: release.wait(10))))
        green.sleep(0.05)
        clock.now += 1.0
    # One in the pool and two set aside: the bound is reached, a fourth call waits.
    assert len(opened) == 3
    assert pool.statistics().stuck == 2
    fourth = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: None))
    green.sleep(0.1)
    clock.now += 10.0
    green.sleep(0.1)
    assert not fourth.done() and len(opened) == 3
    release.set()
    fourth.wait()
    for task in hung:
        task.wait()


def test_a_lost_generation_refuses_new_calls_and_closes_busy_ones_after_their_call():
    pool, opened = make_pool(size=2)
    release = green.native_event()
    busy = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: release.wait(10)))
    green.sleep(0.05)
    idle_after = pool.run(0, lambda raw: raw.number)  # a second connection, now idle
    idle = pool.reset(1)
    assert [c.raw.number for c in idle] == [idle_after]
    with pytest.raises(exception.HypervisorUnavailable):
        pool.run(0, lambda raw: None)
    release.set()
    busy.wait()
    for _ in range(100):
        if opened[0].closed:
            break
        green.sleep(0.01)
    assert opened[0].closed
    assert pool.run(1, lambda raw: raw.number) == 2  # the new generation opens its own


def test_a_failed_open_frees_its_place():
    def open_raw():
        raise RuntimeError("refused")

    pool = ConnectionPool(open_raw, lambda c: None, size=1, stuck_after=1, max_stuck=1)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            pool.run(0, lambda raw: None)
    assert pool.statistics().busy == 0 and pool.in_flight == 0


def test_statistics_are_safe_from_a_native_thread_while_calls_come_and_go():
    """The metrics scrape reads them from its own native thread."""
    pool, _ = make_pool(size=2)
    errors: list[BaseException] = []
    stop = green.native_event()

    def scrape() -> None:
        try:
            while not stop.is_set():
                stats = pool.statistics()
                assert 0 <= stats.busy <= stats.size + stats.stuck
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = green.native_thread(scrape, name="scrape")
    try:
        for generation in range(20):
            tasks = [green.spawn(pool.run, generation, lambda raw: raw.call(lambda: None))]
            for task in tasks:
                task.wait()
            pool.reset(generation + 1)
    finally:
        stop.set()
        reader.join(5)
    assert errors == []


class CountingClock:
    """The real clock, counting how often the pool looks for a free connection."""

    def __init__(self) -> None:
        self.looks = 0

    def __call__(self) -> float:
        self.looks += 1
        return green.monotonic()


def test_callers_waiting_for_a_connection_are_woken_by_its_return_not_by_polling():
    """Five callers wait 0.5 s for the only connection and each is woken by the
    call before it: while it is held they look once each, where a 10 ms poll
    looked 246 times; with a 30 s re-check only the wakes can end the waits."""
    clock = CountingClock()
    pool, _ = make_pool(size=1, clock=clock, recheck=30.0)
    release = green.native_event()
    holder = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: release.wait(10)))
    green.sleep(0.05)
    waiters = [green.spawn(pool.run, 0, lambda raw: raw.call(lambda: None)) for _ in range(5)]
    green.sleep(0.5)
    looks_while_held = clock.looks
    release.set()
    for task in [holder, *waiters]:
        assert task.result(timeout=10) == 0
    assert looks_while_held <= 6 + 1, looks_while_held
    assert pool.statistics().busy == 0 and not pool._waiters


def test_a_cancelled_waiter_passes_its_wake_on():
    """Woken and then cancelled, or cancelled first: either way the next caller
    is woken (with a 30 s re-check, nothing else would wake it in time)."""
    pool, _ = make_pool(size=1, recheck=30.0)
    release = green.native_event()
    holder = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: release.wait(10)))
    green.sleep(0.05)
    first = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: None))
    green.sleep(0.02)
    second = green.spawn(pool.run, 0, lambda raw: raw.call(lambda: None))
    green.sleep(0.02)
    release.set()
    first.cancel()
    assert holder.result(timeout=10) == 0
    assert second.result(timeout=10) == 0
    assert not pool._waiters
