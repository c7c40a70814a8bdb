"""The one rule for "this domain is really in that state": it persisted.

A domain passes through states that mean nothing on their own: a reboot
(in the guest, or a destroy then create from outside) is shut off for a
moment, and QEMU is PAUSED while it starts up. Recording such a moment as
vm_state ``stopped`` (or ``paused``), and then enforcing it, stops the guest
the user just rebooted or started (nova bugs 1293480 and 1443186).

So a state in UNSTEADY counts only once it has persisted for ``delay``
seconds (``[libvirt] lifecycle_event_delay``) and been read again after
that: seen first at t, read again at t + delay or later with no lifecycle
event in between. The sync, lifecycle events and operations all ask this
module; none of them judges a passing state on its own:

* the sync and events go through :class:`SteadyWatch`, which remembers when
  each instance was first seen (or reported by an event) in such a state;
  until the delay is over they record power_state only and schedule a
  re-check of that instance;
* an operation, holding the instance's lock, waits the state out with
  :func:`wait_steady`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from compute_agent import green
from compute_agent.states import PowerState

# States a domain passes through on its way elsewhere: a reboot's shut-off,
# QEMU's start-up pause. A running or PM-suspended domain is what it says.
UNSTEADY = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED, PowerState.PAUSED})
# How often an operation re-reads a passing state, at most.
POLL_S = 0.25
# An operation stops waiting after this many delays even if the state flaps.
MAX_DELAYS = 3


def is_unsteady(state: PowerState | None, expected: Collection[PowerState] = ()) -> bool:
    """Whether ``state`` must persist before it counts.

    ``expected`` are states the caller itself just brought about (a stop's
    shut-off): those count at once.
    """
    return state in UNSTEADY and state not in expected


class SteadyWatch:
    """When each instance was first seen in an unsteady state, and which.

    Used by the sync (periodic, forced, and per event): ``observe`` says
    whether a state read now counts. A lifecycle event means the domain
    changed meanwhile, so it restarts the clock (``event``).
    """

    def __init__(self, delay: float, clock: Callable[[], float] = green.monotonic) -> None:
        self.delay = max(0.0, delay)
        self._clock = clock
        self._first: dict[str, tuple[PowerState, float]] = {}

    def observe(self, uuid: str, state: PowerState | None) -> bool:
        """True if ``state``, read now, is steady: not unsteady, or unchanged for ``delay``."""
        if not is_unsteady(state):
            self._first.pop(uuid, None)
            return True
        assert state is not None
        now = self._clock()
        seen = self._first.get(uuid)
        if seen is None or seen[0] is not state:
            self._first[uuid] = (state, now)
            return self.delay == 0
        if now - seen[1] >= self.delay:
            del self._first[uuid]
            return True
        return False

    def event(self, uuid: str, state: PowerState | None = None) -> None:
        """A lifecycle event for the instance: the clock starts again, from now.

        ``state`` is what the event says the domain became (STOPPED: shut
        off), so the delayed sync that follows it can count it as seen then.
        """
        if is_unsteady(state):
            assert state is not None
            self._first[uuid] = (state, self._clock())
        else:
            self._first.pop(uuid, None)

    def forget(self, uuid: str) -> None:
        """An operation settled the instance (or deleted it): nothing is pending."""
        self._first.pop(uuid, None)

    def remaining(self, uuid: str) -> float:
        """Seconds until a state seen now could count: when to re-check."""
        seen = self._first.get(uuid)
        if seen is None:
            return self.delay
        return max(0.0, self.delay - (self._clock() - seen[1]))

    @property
    def watched(self) -> int:
        """Instances whose passing state is being timed."""
        return len(self._first)


class Clock(Protocol):
    """What :func:`wait_steady` needs of time: :mod:`compute_agent.green`, or a test's own."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


def wait_steady(
    read: Callable[[], PowerState | None],
    delay: float,
    expected: Collection[PowerState] = (),
    clock: Clock = green,
) -> PowerState | None:
    """Read until the state is steady, under the caller's lock; return it.

    An unsteady state (not in ``expected``) is read again until it changes
    to a steady one or has stayed the same for ``delay`` seconds; a change
    starts the clock again. After ``MAX_DELAYS`` delays of flapping the
    last state read is returned. None (no domain) is steady. ``clock``
    lets a test pass the time it waits instead of sleeping it.
    """
    state = read()
    if delay <= 0:
        return state
    poll = min(POLL_S, delay / 4)
    started = since = clock.monotonic()
    while is_unsteady(state, expected):
        now = clock.monotonic()
        if now - since >= delay or now - started >= MAX_DELAYS * delay:
            break
        clock.sleep(poll)
        fresh = read()
        if fresh is not state:
            state, since = fresh, clock.monotonic()
    return state
