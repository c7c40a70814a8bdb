"""The one rule for "really stopped": a passing state counts once it persisted."""

from compute_agent import green, steady
from compute_agent.states import PowerState as P
from tests.helpers import VirtualClock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_shutoff_counts_only_when_read_again_after_the_delay():
    clock = Clock()
    watch = steady.SteadyWatch(15, clock)
    assert not watch.observe("u", P.SHUTDOWN)  # first seen
    clock.now += 14.9
    assert not watch.observe("u", P.SHUTDOWN)
    assert abs(watch.remaining("u") - 0.1) < 1e-6
    clock.now += 0.1
    assert watch.observe("u", P.SHUTDOWN)  # persisted 15 s


def test_a_change_or_an_event_starts_the_clock_again():
    clock = Clock()
    watch = steady.SteadyWatch(15, clock)
    watch.observe("u", P.SHUTDOWN)
    clock.now += 10
    assert not watch.observe("u", P.PAUSED)  # another passing state: from now
    clock.now += 10
    assert not watch.observe("u", P.SHUTDOWN)
    clock.now += 10
    watch.event("u", P.SHUTDOWN)  # a STOPPED event: seen shut off now
    assert not watch.observe("u", P.SHUTDOWN)
    clock.now += 15
    assert watch.observe("u", P.SHUTDOWN)
    watch.observe("u", P.SHUTDOWN)
    clock.now += 20
    watch.event("u")  # a STARTED event: nothing is pending
    assert not watch.observe("u", P.SHUTDOWN)


def test_steady_states_count_at_once_and_clear_the_clock():
    watch = steady.SteadyWatch(15, Clock())
    for state in (P.RUNNING, P.SUSPENDED, None):
        assert watch.observe("u", state)
    watch.observe("u", P.SHUTDOWN)
    assert watch.observe("u", P.RUNNING) and watch.watched == 0
    assert steady.SteadyWatch(0).observe("u", P.SHUTDOWN)  # no delay: at once


def test_wait_steady_waits_out_a_boot_pause_and_counts_expected_states_at_once():
    states = iter([P.PAUSED, P.PAUSED, P.RUNNING])
    assert steady.wait_steady(lambda: next(states), 5, clock=VirtualClock()) is P.RUNNING
    reads = []

    def shut_off():
        reads.append(1)
        return P.SHUTDOWN

    assert steady.wait_steady(shut_off, 5, expected={P.SHUTDOWN}) is P.SHUTDOWN
    assert len(reads) == 1


def test_wait_steady_returns_a_state_that_persisted_and_gives_up_on_flapping():
    clock = VirtualClock()
    started = clock.monotonic()
    assert steady.wait_steady(lambda: P.SHUTDOWN, 0.2, clock=clock) is P.SHUTDOWN
    assert clock.monotonic() - started >= 0.2
    flip = iter([P.SHUTDOWN, P.PAUSED] * 1000)
    started = clock.monotonic()
    assert steady.wait_steady(lambda: next(flip), 0.2, clock=clock) in (P.SHUTDOWN, P.PAUSED)
    assert clock.monotonic() - started < steady.MAX_DELAYS * 0.2 + 2  # bounded


def test_wait_steady_waits_on_the_real_clock_by_default():
    """The default clock is the agent's own: the delay is really waited."""
    started = green.monotonic()
    assert steady.wait_steady(lambda: P.SHUTDOWN, 0.05) is P.SHUTDOWN
    assert green.monotonic() - started >= 0.05
